"""A real Orthanc PACS for tests and the PACS benchmark: a plain process on loopback, storage in a temp folder.

Debian packages `orthanc` and `orthanc-dicomweb` (the service script needs an init system, so the server is
started here as a process and stopped by its own pid). `find_orthanc()` says why it cannot run, if it cannot.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedrad.deploy.processes import free_port, wait_for_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
INSTALL_HINT = "apt-get update && apt-get install -y orthanc orthanc-dicomweb"


def find_orthanc() -> tuple[str | None, str]:
    """(path of the Orthanc binary, '') or (None, why it cannot be used)."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None:
        return None, f"Orthanc is not installed (install: {INSTALL_HINT})"
    if not DICOMWEB_PLUGIN.exists():
        return None, f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; install: {INSTALL_HINT})"
    return exe, ""


@dataclass
class Orthanc:
    """One running Orthanc; `stop()` ends it by its pid."""

    proc: subprocess.Popen
    http_port: int
    dicom_port: int
    workdir: Path
    auth: tuple[str, str] | None = None  # HTTP basic user, password (REST and DICOMweb)

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+{self.rest}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def _open(self, path: str, data: bytes | None = None, method: str | None = None):
        headers = {"Content-Type": "application/dicom"} if data is not None else {}
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        req = urllib.request.Request(f"{self.rest}{path}", data=data, headers=headers,
                                     method=method or ("POST" if data is not None else "GET"))
        return urllib.request.urlopen(req, timeout=60)

    def upload(self, path: Path | bytes) -> str:
        """POST one file to /instances; Orthanc's status: 'Success' or 'AlreadyStored' (same SOP UID)."""
        return str(self.upload_json(path)["Status"])

    def upload_json(self, path: Path | bytes) -> dict:
        """Orthanc's whole answer to an upload (its own instance 'ID' included)."""
        with self._open("/instances", path if isinstance(path, bytes) else path.read_bytes()) as resp:
            return dict(json.loads(resp.read()))

    def delete(self, orthanc_id: str) -> None:
        with self._open(f"/instances/{orthanc_id}", method="DELETE"):
            pass

    def instance_count(self) -> int:
        with self._open("/statistics") as resp:
            return int(json.loads(resp.read())["CountInstances"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_orthanc(workdir: Path, timeout: float = 60, auth: tuple[str, str] | None = None) -> Orthanc:
    """Start Orthanc with HTTP + DICOM on 127.0.0.1 (free ports), DICOMweb on, storage under `workdir`;
    `auth`: require HTTP basic authentication with this (user, password)."""
    exe, why = find_orthanc()
    if exe is None:
        raise FileNotFoundError(why)
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "fedrad-test", "DicomAet": ORTHANC_AET, "HttpPort": http_port, "DicomPort": dicom_port,
        "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(auth), "HttpServerEnabled": True,
        "RegisteredUsers": dict([auth]) if auth else {},
        "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowEcho": True, "StorageCompression": False,
        "OverwriteInstances": False, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpThreadsCount": 8,
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = open(workdir / "orthanc.log", "ab")
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    log.close()
    server = Orthanc(proc, http_port, dicom_port, workdir, auth)
    try:
        wait_for_port("127.0.0.1", http_port, timeout, proc)
        wait_for_port("127.0.0.1", dicom_port, timeout, proc)
        deadline = time.time() + timeout
        while True:
            try:
                server.instance_count()
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
    except BaseException:
        server.stop()
        raise
    return server


class TlsFront:
    """HTTPS in front of Orthanc's HTTP (GET only), as a hospital's reverse proxy would be.

    Debian's Orthanc 1.10.1 dies on the first request when its own HTTPS ("SslEnabled") is on, so the TLS
    tests terminate TLS here: a real TLS server with a certificate from a test CA, forwarding to Orthanc."""

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        import http.server
        import threading

        class Forward(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                req = urllib.request.Request(upstream + self.path, headers=headers)
                try:
                    resp = urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as err:
                    resp = err
                body = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Forward)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+https://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
