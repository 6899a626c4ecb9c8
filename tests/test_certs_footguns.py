"""Operator and site footguns: `certs init` never replaces a consortium, `certs add-site` extends one, and a
node whose key is not enrolled says so in one line with the command that enrols it (real SuperLink)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedrad.deploy.certs import init_certs, tls_files
from fedrad.deploy.cli import main

FEDRAD = str(Path(sys.executable).parent / "fedrad")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_certs_init_twice_is_refused_and_the_ca_is_unchanged(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["certs", "init", "--out", str(out), "--sites", "site-a", "--hosts", "127.0.0.1"]) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(["certs", "init", "--out", str(out), "--sites", "site-a,site-b", "--hosts", "127.0.0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a consortium CA" in err[0] and "add-site" in err[0], err
    assert _tree(out) == before  # CA, coordinator certificate and site keys byte for byte


def test_certs_add_site_extends_the_consortium(tmp_path, capsys):
    out = tmp_path / "c"
    init_certs(out, ["site-a"], ["127.0.0.1"])
    before = _tree(out)
    assert main(["certs", "add-site", "site-d", "--certs", str(out)]) == 0
    assert "fedrad certs register" in capsys.readouterr().out
    after = _tree(out)
    assert {k: after[k] for k in before} == before  # nothing existing changed
    assert sorted(set(after) - set(before)) == ["sites/site-d/ca.pem", "sites/site-d/node.key", "sites/site-d/node.pub"]
    assert after["sites/site-d/ca.pem"] == before["ca.pem"]
    assert (out / "sites" / "site-d" / "node.key").stat().st_mode & 0o777 == 0o600
    tls = tls_files(out, "site-d")
    assert tls.node_private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert main(["certs", "add-site", "site-d", "--certs", str(out)]) == 2  # never replaces a site's key
    assert main(["certs", "add-site", "x", "--certs", str(tmp_path / "none")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


@pytest.mark.slow
def test_an_unenrolled_node_says_so_in_one_line(tmp_path):
    """A real SuperLink with node authentication; `fedrad node` with a key never registered there."""
    from fedrad.deploy.processes import ProcessGroup, free_port, superlink_command, wait_for_port

    init_certs(tmp_path / "c", ["site-a"], ["127.0.0.1"])
    (tmp_path / "state").mkdir()
    (tmp_path / "data").mkdir()
    port = free_port()
    with ProcessGroup() as group:
        link = group.start("superlink", superlink_command(tmp_path / "state", "127.0.0.1", port,
                                                          tls_files(tmp_path / "c"), node_auth=True),
                           tmp_path / "superlink.log")
        wait_for_port("127.0.0.1", port, 60, link)
        res = subprocess.run([FEDRAD, "node", "--data", str(tmp_path / "data"), "--no-scan", "--allow-unsigned",
                              "--superlink", f"127.0.0.1:{port}", "--certs", str(tmp_path / "c" / "sites" / "site-a"),
                              "--port", str(free_port()), "--state-dir", str(tmp_path / "site-state")],
                             capture_output=True, text=True, timeout=300)
    said = [line for line in res.stderr.splitlines() if line.startswith("fedrad node:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(said) == 1 and "not enrolled" in said[0], res.stderr
    assert "fedrad certs register CERTS/sites/site-a/node.pub --certs CERTS" in said[0]
