"""`fedrad dashboard` in-process (Starlette's TestClient on the real app): the run directory read incrementally,
the pages' data (named sites, integer rounds, ETA, screening codes), and access: without the token every page
and API route answers 401/403; path traversal, other methods and oversized requests are refused."""

from __future__ import annotations

import json
import os

import pytest
from starlette.testclient import TestClient

from fedrad.common.atomic import atomic_write
from fedrad.deploy.dashboard import build_app, check_exposure, read_token
from fedrad.server.run_log import append_metrics
from fedrad.server.run_watch import MetricsTail, RunWatch

TOKEN = "s3cret-token-0123456789"


def _row(rnd: int, **extra) -> dict:
    return {"round": rnd, "sites_answered": 2, "sites_aggregated": 2, "train_loss": 4.0 - rnd, "eval_loss": 4.5 - rnd,
            "round_seconds": 10.0, "time_send": 0.5, "time_wait": 8.0, "time_site_compute_max": 6.0,
            "time_aggregate": 0.2, "time_checkpoint": 0.3, "site_names": {"11": "hannover", "22": "leipzig"},
            "sites": {"11": {"train_loss": 3.0, "num_examples": 40, "dp_epsilon": 0.5 * rnd},
                      "22": {"train_loss": 3.5, "num_examples": 60, "probe_auc": 0.7}}, **extra}


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": 42, "started": 1000.0, "config": {
        "num-server-rounds": 4, "strategy": "fedavg", "objective": "simclr", "model": "resnet18"}}))
    append_metrics(folder, _row(1))
    append_metrics(folder, _row(2, rejected={"22": "error reply: code 7 (refused by the site's policy)"},
                                capped={"11": "weight share cut to at most 0.5 of the round"}))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "round-0002.safetensors").write_bytes(b"x")
    return tmp_path / "runs"


def test_metrics_are_read_incrementally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert not tail.poll() and tail.rows == []
    path.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "trai')  # round 2 still being written
    assert tail.poll() and [r["round"] for r in tail.rows] == [1]
    offset = tail.offset
    assert offset == len(json.dumps({"round": 1})) + 1
    with open(path, "a") as fh:
        fh.write('n_loss": 1.5}\n')
    assert tail.poll() and [r["round"] for r in tail.rows] == [1, 2] and tail.offset > offset
    assert not tail.poll()  # nothing new: nothing read
    # A resume rewrites the file without the crashed round (atomically: a new file): the tail starts over.
    atomic_write(path, lambda p: p.write_text(json.dumps({"round": 1, "train_loss": 9.0}) + "\n"))
    assert tail.poll() and tail.rows == [{"round": 1, "train_loss": 9.0}]


def test_run_view_names_sites_and_splits_round_time(runs):
    watch = RunWatch(runs / "r1")
    s = watch.summary(now=1100.0)
    assert (s["status"], s["round"], s["rounds_planned"], s["run_id"]) == ("running", 2, 4, "42")
    assert s["elapsed_seconds"] == 100.0 and s["eta_seconds"] == 20.0 and s["train_loss"] == 2.0
    d = watch.detail()
    assert d["rounds"] == [1, 2] and d["site_names"] == ["hannover", "leipzig"]
    assert d["sites"]["hannover"]["dp_epsilon"] == [[1, 0.5], [2, 1.0]] and d["epsilon"] == {"hannover": 1.0}
    assert d["timing"]["time_wait"] == [8.0, 8.0]
    assert {(x["site"], x["action"], x["code"]) for x in d["screening"]} == {("leipzig", "rejected", 7),
                                                                            ("hannover", "capped", None)}
    assert [c["name"] for c in d["checkpoints"]] == ["round-0002.safetensors"]
    (runs / "r1" / "summary.json").write_text(json.dumps({"finished": 1200.0, "stopped": "completed"}))
    s = watch.summary(now=5000.0)
    assert s["status"] == "finished:completed" and s["elapsed_seconds"] == 200.0 and s["eta_seconds"] is None


ROUTES = ["/", "/api/runs", "/api/runs/r1", "/api/sites", "/static/plotly.min.js", "/static/dashboard.js",
          "/static/dashboard.css", "/api/runs/nope", "/nowhere"]


@pytest.mark.parametrize("route", ROUTES)
def test_without_the_token_every_route_answers_401(runs, route):
    client = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs, token=TOKEN))
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Cookie": "fedrad_dashboard=forged"}):
        response = client.get(route, headers=headers)
        assert response.status_code == 401, (route, headers, response.status_code)
        assert "hannover" not in response.text and "42" not in response.text


def test_signing_in_with_the_token(runs):
    client = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs, token=TOKEN))
    assert client.post("/login", data={"token": "wrong"}).status_code == 403
    assert "fedrad_dashboard" not in client.cookies
    response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 303
    assert "httponly" in response.headers["set-cookie"].lower() and TOKEN not in response.headers["set-cookie"]
    assert client.get("/api/runs").json()["runs"][0]["name"] == "r1"
    bearer = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs, token=TOKEN))
    assert bearer.get("/api/runs/r1", headers={"Authorization": f"Bearer {TOKEN}"}).json()["round"] == 2


def test_pages_load_nothing_from_elsewhere(runs):
    client = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs))
    page = client.get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page.text and "https://" not in page.text and "//" not in page.text.replace("<!--", "")
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    assert client.get("/static/dashboard.js").status_code == 200


@pytest.mark.parametrize("raw", ["/api/runs/..%2F..%2Fetc%2Fpasswd", "/api/runs/%2e%2e", "/static/..%2fdashboard.py",
                                 "/static/%2e%2e%2f%2e%2e%2fpyproject.toml", "/api/runs/r1%00", "/api/runs/..\\r1",
                                 "/api/runs/.hidden"])
def test_path_traversal_is_refused(runs, raw):
    client = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs))
    response = client.get(raw)
    assert response.status_code in (400, 404), (raw, response.status_code)
    assert "root:" not in response.text and "[build-system]" not in response.text


def test_oversized_and_writing_requests_are_refused(runs):
    client = TestClient(base_url="http://127.0.0.1:8050", app=build_app(runs, token=TOKEN))
    assert client.get("/api/runs/" + "a" * 600).status_code == 414
    assert client.get("/api/runs?x=" + "b" * 600).status_code == 414
    assert client.post("/login", content=b"token=" + b"x" * 10_000,
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/runs").status_code == 405
    assert client.post("/api/runs").status_code == 405


def test_binding_beyond_loopback_needs_tls_and_a_token(tmp_path, monkeypatch):
    check_exposure("127.0.0.1", None, None, None)
    check_exposure("::1", None, None, None)
    with pytest.raises(ValueError, match="only with TLS"):
        check_exposure("0.0.0.0", TOKEN, None, None)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ValueError, match="only with TLS"):
        check_exposure("0.0.0.0", None, str(cert), str(key))
    check_exposure("0.0.0.0", TOKEN, str(cert), str(key))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_token(str(token_file))
    os.chmod(token_file, 0o600)
    assert read_token(str(token_file)) == TOKEN
    monkeypatch.setenv("FEDRAD_DASHBOARD_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16"):
        read_token(None)
    monkeypatch.delenv("FEDRAD_DASHBOARD_TOKEN")
    assert read_token(None) is None


def test_dashboard_command_refuses_an_exposed_bind_in_one_line(tmp_path, capsys):
    from fedrad.deploy.cli import main

    assert main(["dashboard", "--runs-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only with TLS" in err[0]


def test_another_host_name_is_refused(runs):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own name as Host: refused."""
    client = TestClient(build_app(runs), base_url="http://127.0.0.1:8050")
    assert client.get("/api/runs").status_code == 200
    assert client.get("/api/runs", headers={"host": "localhost:8050"}).status_code == 200
    assert client.get("/api/runs", headers={"host": "[::1]:8050"}).status_code == 200
    for host in ("evil.example:8050", "evil.example", "127.0.0.1.evil.example:8050"):
        response = client.get("/api/runs", headers={"host": host})
        assert response.status_code == 400 and "r1" not in response.text, host
    named = TestClient(build_app(runs, hosts=("coordinator.example.org",)), base_url="https://coordinator.example.org")
    assert named.get("/api/runs").status_code == 200


def test_served_over_tls_with_a_token(tmp_path, runs):
    """`fedrad dashboard` as its own process with the consortium's TLS certificate: HTTPS only, the token
    required, the sign-in cookie marked Secure."""
    import subprocess
    import sys

    import httpx

    from fedrad.deploy.certs import init_certs
    from fedrad.deploy.processes import free_port, wait_for_port

    certs = tmp_path / "certs"
    init_certs(certs, ["site-a"], ["localhost", "127.0.0.1"])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedrad.deploy.cli", "dashboard", "--runs-dir", str(runs),
                             "--port", str(port), "--tls-cert", str(certs / "coordinator.pem"), "--tls-key",
                             str(certs / "coordinator.key"), "--token-file", str(token_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=str(certs / "ca.pem"), base_url=base, follow_redirects=False) as client:
            assert client.get("/api/runs").status_code == 401
            listed = client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert listed["runs"][0]["name"] == "r1"
            signed_in = client.post("/login", data={"token": TOKEN})
            assert signed_in.status_code == 303 and "secure" in signed_in.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
