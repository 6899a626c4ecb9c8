"""Consortium PKI: the CA, the coordinator certificate and the site keys. The secure transport itself (TLS with the
consortium CA, SuperNode authentication, refusals) runs in tests/test_readme_recipes.py, through the README."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest

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


def test_register_against_a_stopped_coordinator_says_why_in_one_line(tmp_path, capsys, monkeypatch):
    """Real `flwr supernode register` against a port nothing listens on: exit 1 and Flower's reason on one line,
    no traceback (the retry window, 60 s while a coordinator starts, is skipped by moving the clock)."""
    import itertools

    from fedrad.deploy import certs as certs_module
    from fedrad.deploy.cli import main
    from fedrad.deploy.processes import free_port

    init_certs(tmp_path / "c", ["site-a"], ["127.0.0.1"])
    clock = itertools.count(0, 1000)
    monkeypatch.setattr(certs_module, "_now", lambda: next(clock))
    code = main(["certs", "register", str(tmp_path / "c" / "sites" / "site-a" / "node.pub"), "--certs",
                 str(tmp_path / "c"), "--superlink", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("fedrad certs register:") and "unavailable" in err[0], err
