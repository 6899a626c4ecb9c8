"""A real Orthanc PACS for tests and the PACS benchmark: a plain process on loopback, storage in a temp folder.

Debian packages `orthanc` and `orthanc-dicomweb` (the service script needs an init system, so the server is
started here as a process and stopped by its own pid). `find_orthanc()` says why it cannot run, if it cannot.
"""

from __future__ import annotations

import json
import shutil
import signal
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

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+{self.rest}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def upload(self, path: Path) -> str:
        """POST one file to /instances; Orthanc's status: 'Success' or 'AlreadyStored' (same SOP UID)."""
        req = urllib.request.Request(f"{self.rest}/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return str(json.loads(resp.read())["Status"])

    def instance_count(self) -> int:
        with urllib.request.urlopen(f"{self.rest}/statistics", timeout=30) as resp:
            return int(json.loads(resp.read())["CountInstances"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_orthanc(workdir: Path, timeout: float = 60) -> Orthanc:
    """Start Orthanc with HTTP + DICOM on 127.0.0.1 (free ports), DICOMweb on, storage under `workdir`."""
    exe, why = find_orthanc()
    if exe is None:
        raise FileNotFoundError(why)
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "fedrad-test", "DicomAet": ORTHANC_AET, "HttpPort": http_port, "DicomPort": dicom_port,
        "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
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
    server = Orthanc(proc, http_port, dicom_port, workdir)
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
