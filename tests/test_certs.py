"""Consortium PKI and the secure transport: TLS with the consortium CA and SuperNode authentication."""

from __future__ import annotations

import ipaddress
import stat
import time
from pathlib import Path

import pytest
from federation_harness import Consortium

from fedrad.deploy.certs import init_certs, register_node, tls_files


def test_init_certs_layout_and_permissions(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    out = tmp_path / "certs"
    init_certs(out, ["site-a", "site-b"], ["coord.example.org", "10.0.0.5", "127.0.0.1"])
    for key in [out / "ca.key", out / "coordinator.key", out / "sites" / "site-a" / "node.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(out.rglob(".*"))  # no temp files left behind
    cert = x509.load_pem_x509_certificate((out / "coordinator.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    priv = load_ssh_private_key((out / "sites" / "site-a" / "node.key").read_bytes(), password=None)
    pub = load_ssh_public_key((out / "sites" / "site-a" / "node.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    files = tls_files(out, "site-b")
    assert files.node_private_key == (out / "sites" / "site-b" / "node.key").resolve()
    assert tls_files(out).server_key == (out / "coordinator.key").resolve()
    with pytest.raises(FileNotFoundError):
        tls_files(tmp_path / "nowhere")
    with pytest.raises(ValueError):
        init_certs(tmp_path / "bad", ["../escape"], ["localhost"])


def _exited(proc, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_enrolled_node_runs_unenrolled_and_untrusting_nodes_refused(tmp_path):
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics, site_labels

    sites = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=6, images_per_patient=(1, 3),
                                  size=64, seed=1)
    certs = tmp_path / "certs"
    init_certs(certs, ["good", "stranger"], ["localhost", "127.0.0.1"])
    other = tmp_path / "other-consortium"
    init_certs(other, ["good"], ["localhost", "127.0.0.1"])
    c = Consortium(tmp_path)
    try:
        c.start_link(tls_files(certs), node_auth=True)
        register_node(tls_files(certs, "good").node_public_key, c.address, certs)
        good = c.start_node("good", sites[0], tls=tls_files(certs, "good"))
        stranger = c.start_node("stranger", sites[0], tls=tls_files(certs, "stranger"))  # never registered
        # Enrolled key, but the node trusts another CA: the TLS handshake with the coordinator fails.
        wrong_ca = tls_files(certs, "good")
        wrong_ca.ca_cert = (other / "ca.pem").resolve()
        c.start_node("untrusting", sites[0], tls=wrong_ca)
        assert _exited(stranger, 90), "an unenrolled SuperNode must be refused"
        assert stranger.returncode != 0
        assert "No SuperNode found" in (tmp_path / "logs" / "superlink.log").read_text()
        run_dir = tmp_path / "run"
        code = c.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir),
                      "min-train-nodes": 1, "min-available-nodes": 1})
        assert code == 0
        assert good.poll() is None
        (row,) = read_metrics(run_dir)
        assert row["sites_answered"] == 1  # only the enrolled, trusting node took part
        # The coordinator names the site by its enrolment (`--name good`), in metrics.jsonl and the plot.
        assert list(row["site_names"].values()) == ["good"] and list(site_labels([row]).values()) == ["good"]
        # The coordinator's log files are plain text (no colour codes), the run's own lines included.
        for name in ("flwr-run.log", "superlink.log"):
            text = (tmp_path / "logs" / name).read_text()
            assert "\x1b[" not in text and "INFO" in text, name
        assert "per site: good loss" in (tmp_path / "logs" / "flwr-run.log").read_text()
        # The node that does not trust the consortium CA never got a message (and Flower gives up on it).
        log = (tmp_path / "logs" / "node-untrusting.log").read_text()
        assert "Receiving:" not in log, log[-2000:]
        assert "Receiving:" in (tmp_path / "logs" / "node-good.log").read_text()
    finally:
        c.stop()


def test_cli_certs_init(tmp_path, capsys):
    from fedrad.deploy.cli import main

    assert main(["certs", "init", "--out", str(tmp_path / "c"), "--sites", "x,y", "--hosts", "localhost"]) == 0
    assert (tmp_path / "c" / "sites" / "y" / "node.pub").exists()
    text = capsys.readouterr().out
    assert "BEGIN" not in text  # private material is never printed


def test_register_needs_ca(tmp_path):
    with pytest.raises(FileNotFoundError):
        register_node(tmp_path / "missing.pub", "127.0.0.1:1", tmp_path)
    Path(tmp_path / "k.pub").write_text("x")
    with pytest.raises(FileNotFoundError):
        register_node(tmp_path / "k.pub", "127.0.0.1:1", tmp_path)
