"""A hostile DICOMweb PACS on loopback: it pages QIDO results forever, repeats a page, sends huge bodies,
redirects. The site's pull must stop with one clear line (exit 2, no traceback) and bounded memory.

The server is a real HTTP server (http.server in a thread of the test); `fedrad scan` runs as its own
process, whose peak RSS is the kernel's high-water mark of its own image (VmHWM), read while it runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from fedrad.common.sources.layout import open_pacs
from fedrad.common.sources.pacs import PacsOptions

FEDRAD = str(Path(sys.executable).parent / "fedrad")
RSS_BOUND_MB = 300  # issue 25: the endless-QIDO server must not take the node past this
KILL_AT_MB = 800  # a pull that grows past this is stopped (it would grow without end)


def _instance(i: int) -> dict:
    uid = f"1.2.826.0.1.3680043.10.999.{i}"
    return {"0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4.5"]},
            "00080018": {"vr": "UI", "Value": [uid]}, "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
            "00080060": {"vr": "CS", "Value": ["CR"]}}


class Hostile(BaseHTTPRequestHandler):
    """/forever: every page full and new; /same: the same full page whatever the offset; /huge: a QIDO body
    of 256 MiB with no Content-Length; /redirect: 302 to /forever; /bigwado: one instance listed, whose
    retrieval sends endless bytes."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, content_type: str, total: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        chunk = b"[" + b"{}," * (1 << 16)
        sent = 0
        try:
            while sent < total:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client stopped reading: what it should do
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        mode = url.path.strip("/").split("/")[0]
        query = parse_qs(url.query)
        limit = int(query.get("limit", ["1000"])[0])
        offset = int(query.get("offset", ["0"])[0])
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/forever/instances")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "forever":
            self._json([_instance(offset + i) for i in range(limit)])
        elif mode == "same":
            self._json([_instance(i) for i in range(limit)])
        elif mode == "huge":
            self._endless("application/dicom+json", 256 << 20)
        elif mode == "bigwado" and url.path.endswith("/instances") and "/studies/" not in url.path:
            self._json([_instance(0)])
        elif mode == "bigwado":
            self._endless('multipart/related; type="application/dicom"; boundary=x', 1 << 40)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"dicomweb+http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _hwm_mb(pid: int) -> float:
    """The process's peak RSS (VmHWM) since its exec, in MB; 0 once it is gone. Not wait4's ru_maxrss: that
    also counts the moments between fork and exec, when the child still maps the whole test process."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            return next((int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def _scan(url: str, cache: Path, *extra: str) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of `fedrad scan --source URL`; killed past KILL_AT_MB."""
    cmd = [FEDRAD, "scan", "--source", url, "--cache", str(cache), "--quiet", "--no-decode", "--rate", "1000",
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    peak = 0.0
    while proc.poll() is None:  # the high-water mark only grows: the last read before exit is the peak
        peak = max(peak, _hwm_mb(proc.pid))
        if peak > KILL_AT_MB:
            proc.kill()
        time.sleep(0.02)
    reader.join()
    return proc.returncode, "".join(err), peak


@pytest.mark.slow
def test_endless_qido_is_stopped_with_bounded_memory(hostile, tmp_path):
    rc, err, peak = _scan(f"{hostile}/forever", tmp_path / "c")
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "listed more than 100000 instances" in err and len(err.strip().splitlines()) == 1, err
    assert peak <= RSS_BOUND_MB, f"peak RSS {peak:.0f} MB"
    print(f"endless QIDO: stopped at the listing cap, peak RSS {peak:.0f} MB")
    assert not list((tmp_path / "c").rglob("*.dcm"))  # nothing fetched from a listing that was refused


def test_hostile_listings_are_refused_in_one_line(hostile, tmp_path):
    """In-process (the site's own reader): a page sent again, a body over the cap, a redirect."""
    from fedrad.common.sources.pacs import PacsError

    for mode, said in (("same", "same page again"), ("huge", "more than the 4194304 bytes allowed"),
                       ("redirect", "redirect (HTTP 302): not followed")):
        reader = open_pacs(f"{hostile}/{mode}", cache_dir=tmp_path / mode, options=PacsOptions(rate=1000))
        with pytest.raises(PacsError, match=re.escape(said)):
            reader.list_items()
    small = open_pacs(f"{hostile}/forever", cache_dir=tmp_path / "small", options=PacsOptions(rate=1000,
                                                                                               max_listed=2500))
    with pytest.raises(PacsError, match="more than 2500"):
        small.list_items()


def test_oversized_instance_is_not_stored(hostile, tmp_path):
    """An instance body past the pixel budget plus header slack fails that instance, nothing is stored."""
    from fedrad.common.sources.pacs import instance_byte_cap

    reader = open_pacs(f"{hostile}/bigwado", max_pixels=1 << 20, cache_dir=tmp_path / "c",
                       options=PacsOptions(rate=1000))
    listing = reader.list_items()
    assert not listing.items and reader.pull.failed == 1
    (problem,) = listing.skipped
    assert f"more than the {instance_byte_cap(1 << 20)} bytes allowed" in problem.detail
    assert not list(reader.store.root.glob("*.dcm"))


def test_ca_only_from_the_option(monkeypatch, tmp_path, hostile):
    """REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE are ignored: the session verifies with --ca-bundle or the default."""
    bogus = tmp_path / "env-ca.pem"
    bogus.write_text("not a CA")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bogus))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bogus))
    reader = open_pacs(f"{hostile}/same", cache_dir=tmp_path / "c")
    session = reader._client(1024, "test")._session
    assert session.verify is True and session.trust_env is False
    assert session.merge_environment_settings("https://pacs.example/", {}, None, None, None)["verify"] is True
