"""PACS sources against a real Orthanc (DICOMweb plugin + DIMSE), compared with the DICOM folder path.

Orthanc runs as a plain process on loopback (free ports, storage in tmp), holds the shared DICOMs uploaded
through its REST API, requires HTTP basic authentication, and is stopped by its pid at the end. The PACS
scan must list exactly what a folder scan of the same files lists (same skips and reasons), and the decoded
cache must be pixel-equal. Skipped only when Orthanc is not installed (see orthanc_server.INSTALL_HINT).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.site.scan import scan_folder
from fedrad.client.site.site_data import load_site
from fedrad.common.sources.layout import open_pacs
from fedrad.common.sources.pacs import (
    PacsError,
    PacsOptions,
    PacsQuery,
    is_source_url,
    read_credentials,
)

sys.path.insert(0, str(Path(__file__).parent))
from orthanc_server import TlsFront, find_orthanc, start_orthanc  # noqa: E402

SHARED = Path(os.environ.get("FEDRAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DICOM_DIR = SHARED / "dicom"
USER, PASSWORD = "fedrad-site", "s3cret-Pa55"
FEDRAD = str(Path(sys.executable).parent / "fedrad")


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(Orthanc, folder of exactly the files Orthanc kept, credentials file)."""
    exe, why = find_orthanc()
    if exe is None:
        pytest.skip(why)
    files = sorted(DICOM_DIR.glob("*.dcm")) if DICOM_DIR.is_dir() else []
    if not files:
        pytest.skip(f"shared DICOMs not found under {DICOM_DIR} (set FEDRAD_SHARED_DATA)")
    tmp = tmp_path_factory.mktemp("pacs")
    server = start_orthanc(tmp / "orthanc", auth=(USER, PASSWORD))
    try:
        kept = tmp / "kept"
        kept.mkdir()
        for f in files:  # two shared files repeat a SOP Instance UID: the PACS keeps the first one
            if server.upload(f) == "Success":
                shutil.copy(f, kept / f.name)
        auth = tmp / "pacs.auth"
        auth.write_text(f"{USER}:{PASSWORD}\n")
        auth.chmod(0o600)
        yield server, kept, auth
    finally:
        server.stop()


@pytest.fixture(scope="module")
def folder_scan(pacs, tmp_path_factory) -> dict:
    """The folder path's inventory of exactly the files the PACS holds (computed once for both kinds; its scan
    memo kept outside the folder, which holds exactly Orthanc's files)."""
    return scan_folder(pacs[1], progress=False, cache_dir=tmp_path_factory.mktemp("folder-scan-cache"))


@pytest.fixture(scope="module")
def folder_site(pacs, tmp_path_factory):
    """(SiteData of the folder path, the state dir holding its salt): the PACS loads reuse the salt."""
    tmp = tmp_path_factory.mktemp("folder-site")
    return load_site(pacs[1], 64, cache_dir=tmp / "cache", progress=False, state_dir=tmp / "state"), tmp / "state"


def _options(auth: Path, **kw) -> PacsOptions:
    return PacsOptions(auth_file=str(auth), **kw)


def _url(server, kind: str) -> str:
    return server.dicomweb_url if kind == "dicomweb" else server.dimse_url


def _by_sop(report: dict, folder: Path | None) -> dict[str, str]:
    """SOP UID -> status for every file row of a scan report (a folder's rows are keyed by file name)."""
    return {(_sop(folder / row["file"]) if folder else row["file"]): row["status"] for row in report["files"]}


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pacs_scan_lists_what_the_folder_scan_lists(pacs, folder_scan, kind, tmp_path):
    server, kept, auth = pacs
    folder = folder_scan
    remote = scan_folder(_url(server, kind), progress=False, source_options=_options(auth),
                         cache_dir=tmp_path / "cache")
    assert remote["pull"]["listed"] == len(list(kept.iterdir())) == folder["candidates"]
    assert remote["pull"]["fetched"] == remote["pull"]["listed"] and remote["pull"]["failed"] == 0
    assert _by_sop(remote, None) == _by_sop(folder, kept)  # same items, same status (skip reason) each
    assert {_sop(kept / s["file"]): s["reason"] for s in folder["skipped"]} == \
        {s["file"]: s["reason"] for s in remote["skipped"]}
    assert set(remote["skipped_by_reason"]) >= {"no-pixel-data", "decode-failed"}  # the shared bad files
    for key in ("usable", "candidates", "modality", "body_part", "view", "photometric", "transfer_syntax",
                "bits_stored", "sex", "age", "patients", "images_per_patient", "skipped_by_reason"):
        assert remote[key] == folder[key], key
    assert remote["network_used"] is True and remote["source"] == kind


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pacs_decoded_cache_is_pixel_equal_to_the_folder(pacs, folder_site, kind, tmp_path):
    server, kept, auth = pacs
    a, state = folder_site  # one site salt: patient keys comparable too
    b = load_site(_url(server, kind), 64, cache_dir=tmp_path / "pacs-cache", progress=False, state_dir=state,
                  source_options=_options(auth))
    sop_a = [_sop(Path(p)) for p in a.paths]
    sop_b = [Path(p).name.removesuffix(".dcm") for p in b.paths]
    assert sorted(sop_a) == sorted(sop_b) and len(sop_a) >= 9
    ia, ib = np.argsort(sop_a), np.argsort(sop_b)
    assert np.array_equal(np.asarray(a.images)[ia], np.asarray(b.images)[ib])  # pixel-equal, uint16
    assert [a.patient_keys[i] for i in ia] == [b.patient_keys[i] for i in ib]
    for name in a.labels:
        assert [a.labels[name][i] for i in ia] == [b.labels[name][i] for i in ib], name
    assert a.skipped == b.skipped


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pull_is_incremental_resumable_and_rate_limited(pacs, kind, tmp_path):
    import pydicom

    server, kept, auth = pacs
    n = server.instance_count()
    url, cache = _url(server, kind), tmp_path / "cache"
    first = open_pacs(url, cache_dir=cache, options=_options(auth, max_instances=5))
    assert len(first.list_items().items) == 5  # an interrupted pull: 5 stored, the rest pending
    assert (first.pull.fetched, first.pull.pending) == (5, n - 5)
    t0 = time.perf_counter()
    second = open_pacs(url, cache_dir=cache, options=_options(auth, rate=5.0))
    assert len(second.list_items().items) == n
    assert (second.pull.had, second.pull.fetched, second.pull.pending) == (5, n - 5, 0)
    assert time.perf_counter() - t0 >= (n - 5) / 5.0 - 0.3  # at most 5 requests/s, queries included
    # A new instance arrives at the PACS: the next pull fetches exactly that one.
    ds = pydicom.dcmread(sorted(kept.iterdir())[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=[kind, "new"])
    buf = io.BytesIO()
    ds.save_as(buf)
    added = server.upload_json(buf.getvalue())
    try:
        assert added["Status"] == "Success"
        third = open_pacs(url, cache_dir=cache, options=_options(auth))
        assert len(third.list_items().items) == n + 1
        assert (third.pull.had, third.pull.fetched) == (n, 1)
    finally:
        server.delete(added["ID"])  # the other tests compare the PACS with the shared folder
    assert not list((cache / "pacs").rglob("*.tmp")) and not list((cache / "pacs").rglob(".*tmp*"))


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_query_filters_modality_and_study_date(pacs, kind, tmp_path):
    import pydicom

    server, _kept, auth = pacs
    everything = open_pacs(_url(server, kind), cache_dir=tmp_path / "c", options=_options(auth))
    heads = {it.item_id: pydicom.dcmread(it.locator, stop_before_pixels=True)
             for it in everything.list_items().items}
    assert {str(h.Modality) for h in heads.values()} == {"CR", "DX"}
    for terms, since, until in ((["Modality=DX"], None, None), (["Modality=CR,DX"], "2017-01-01", None),
                                ([], None, "2004-12-31"), (["BodyPartExamined=HIP"], None, None)):
        q = PacsQuery.parse(terms, since, until)
        want = {s for s, h in heads.items()
                if q.accepts(str(h.Modality), str(h.get("BodyPartExamined", "")), str(h.get("StudyDate", "")))}
        reader = open_pacs(_url(server, kind), cache_dir=tmp_path / "c", options=_options(auth, query=q))
        got = {it.item_id for it in reader.list_items().items}
        assert got == want and 0 < len(want) < len(heads), (terms, since, until)
        assert reader.pull.fetched == 0  # all already in the store


def test_node_keeps_training_on_its_store_while_the_pacs_is_down(tmp_path):
    """A second, short-lived Orthanc: pull, stop it, then list again with the same source URL."""
    exe, why = find_orthanc()
    if exe is None:
        pytest.skip(why)
    files = sorted(DICOM_DIR.glob("*.dcm"))[:3] if DICOM_DIR.is_dir() else []
    if not files:
        pytest.skip(f"shared DICOMs not found under {DICOM_DIR}")
    server = start_orthanc(tmp_path / "orthanc")
    try:
        for f in files:
            server.upload(f)
        url = server.dimse_url
        first = open_pacs(url, cache_dir=tmp_path / "c", options=PacsOptions(offline_ok=True))
        got = sorted(it.item_id for it in first.list_items().items)
        assert len(got) == 3 and not first.pull.offline
    finally:
        server.stop()
    down = open_pacs(url, cache_dir=tmp_path / "c", options=PacsOptions(offline_ok=True, timeout=5))
    assert sorted(it.item_id for it in down.list_items().items) == got and down.pull.offline
    with pytest.raises(PacsError):  # a scan (offline_ok off) says the PACS is down
        open_pacs(url, cache_dir=tmp_path / "c", options=PacsOptions(timeout=5)).list_items()
    other_query = PacsOptions(offline_ok=True, timeout=5, query=PacsQuery.parse(["Modality=DX"]))
    with pytest.raises(PacsError):  # the remembered listing was for another query
        open_pacs(url, cache_dir=tmp_path / "c", options=other_query).list_items()


def test_dicomweb_over_https_verifies_the_pacs_certificate(tmp_path):
    """TLS verification is on by default: a PACS certificate from an unknown CA is refused (one line, exit 2);
    with --ca-bundle naming the hospital CA the pull works."""
    from fedrad.deploy.certs import init_certs

    exe, why = find_orthanc()
    if exe is None:
        pytest.skip(why)
    files = sorted(DICOM_DIR.glob("*.dcm"))[:2] if DICOM_DIR.is_dir() else []
    if not files:
        pytest.skip(f"shared DICOMs not found under {DICOM_DIR}")
    init_certs(tmp_path / "ca", [], ["127.0.0.1", "localhost"])  # a hospital CA and the PACS's certificate
    server = start_orthanc(tmp_path / "orthanc")
    front = TlsFront(server.rest, tmp_path / "ca" / "coordinator.pem", tmp_path / "ca" / "coordinator.key")
    try:
        for f in files:
            server.upload(f)
        base = [FEDRAD, "scan", "--source", front.dicomweb_url, "--cache", str(tmp_path / "c"), "--quiet",
                "--no-decode"]
        res = subprocess.run(base, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "SSL" in res.stderr, res.stderr
        res = subprocess.run(base + ["--ca-bundle", str(tmp_path / "ca" / "ca.pem")], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "fetched now" in res.stdout and len(list((tmp_path / "c" / "pacs").rglob("*.dcm"))) == len(files)
    finally:
        front.stop()
        server.stop()


def test_cli_scan_source_prints_fetch_and_keeps_the_secret(pacs, tmp_path):
    server, _kept, auth = pacs
    out = tmp_path / "scan.json"
    cmd = [FEDRAD, "scan", "--source", server.dicomweb_url, "--cache", str(tmp_path / "cache"), "--quiet",
           "--query", "Modality=CR,DX", "--json", str(out), "--auth-file", str(auth)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[DICOMweb PACS]" in res.stdout and "fetched now" in res.stdout and "images usable" in res.stdout
    assert PASSWORD not in res.stdout + res.stderr + out.read_text()
    assert json.loads(out.read_text())["pull"]["fetched"] > 0
    # Wrong password: one line, exit 2, no traceback, no secret.
    bad = tmp_path / "bad.auth"
    bad.write_text(f"{USER}:wrong-{PASSWORD}")
    res = subprocess.run(cmd[:-1] + [str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "HTTP 401" in res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    # The same credentials from an environment variable.
    env = dict(os.environ, SITE_PACS_AUTH=f"basic {USER}:{PASSWORD}")
    res = subprocess.run(cmd[:-2] + ["--auth-env", "SITE_PACS_AUTH"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0 match" not in res.stdout and PASSWORD not in res.stdout + res.stderr


# -- without a server ---------------------------------------------------------------------------------
def test_query_and_options_parse_and_round_trip_through_node_config():
    q = PacsQuery.parse(["Modality=cr,DX", "BodyPartExamined=CHEST"], "2020-01-01", "20211231")
    assert (q.modalities, q.body_parts, q.study_date) == (("CR", "DX"), ("CHEST",), "20200101-20211231")
    opts = PacsOptions(query=q, max_instances=7, concurrency=3, rate=2.5, auth_file="/etc/fedrad/pacs.auth",
                       calling_aet="SITE_A")
    assert PacsOptions.from_config(opts.to_config()) == dataclasses.replace(opts, offline_ok=True)  # node rounds
    for bad in (["Modality"], ["PatientName=X"], ["Modality=C;R"], ["Modality=CR\\DX"]):
        with pytest.raises(PacsError):
            PacsQuery.parse(bad)
    with pytest.raises(PacsError):
        PacsQuery.parse([], "2021-01-01", "2020-01-01")
    with pytest.raises(PacsError):
        PacsQuery.parse([], "yesterday")
    for kw in ({"concurrency": 0}, {"rate": 0}, {"max_instances": -1}, {"calling_aet": "A" * 17}):
        with pytest.raises(PacsError):
            PacsOptions(**kw)


def test_credentials_from_file_or_env_never_printed(tmp_path, monkeypatch):
    f = tmp_path / "auth"
    for text, scheme, user in (("alice:pw", "basic", "alice"), ("basic bob:p:w", "basic", "bob"),
                               ("bearer eyJ.abc", "bearer", ""), ("eyJ.abc", "bearer", "")):
        f.write_text(text + "\n")
        cred = read_credentials(PacsOptions(auth_file=str(f)))
        assert (cred.scheme, cred.user) == (scheme, user) and cred.secret not in repr(cred)
    monkeypatch.setenv("PACS_TOKEN", "bearer tok")
    assert read_credentials(PacsOptions(auth_env="PACS_TOKEN")).secret == "tok"
    with pytest.raises(PacsError):
        read_credentials(PacsOptions(auth_env="NOT_SET_ANYWHERE_XYZ"))
    with pytest.raises(PacsError):
        read_credentials(PacsOptions(auth_file=str(tmp_path / "missing")))
    assert read_credentials(PacsOptions()) is None


def _node_location(argv: list[str]):
    """fedrad.deploy.node_command.node_location with the location options `fedrad node ARGV` parses to."""
    from fedrad.client.site.scan import PACS_LIMITS
    from fedrad.deploy.cli import build_parser
    from fedrad.deploy.node_command import node_location

    args = vars(build_parser().parse_args(argv))
    return node_location(args["data"], args["source"], query=args["query"], since=args["since"],
                         until=args["until"], cache=args["cache"], **{k: args[k] for k in PACS_LIMITS})


def test_node_source_options_become_site_local_node_config(tmp_path, monkeypatch):
    from fedrad.deploy.processes import node_config_string

    auth = tmp_path / "auth"
    auth.write_text("bearer t0ken-XYZ")
    data, cache, config, scan_kw = _node_location(["node", "--source", "dimse://PACS@10.1.2.3:104", "--query",
                                                   "Modality=CR,DX", "--since", "2020-01-01", "--max-instances",
                                                   "50", "--rate", "5", "--auth-file", str(auth), "--calling-aet",
                                                   "SITE_A", "--cache", str(tmp_path / "c")])
    assert (data, cache) == ("dimse://PACS@10.1.2.3:104", str(tmp_path / "c"))
    opts = PacsOptions.from_config(config)
    assert opts == dataclasses.replace(scan_kw["source_options"], offline_ok=True)
    assert (opts.query.modalities, opts.query.since, opts.max_instances, opts.rate, opts.calling_aet) == \
        (("CR", "DX"), "20200101", 50, 5.0, "SITE_A")
    assert "t0ken" not in node_config_string({"data-dir": data, **config})
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert "pacs-" in str(_node_location(["node", "--source", "dicomweb+https://pacs.example/dicom-web"])[1])
    for argv in (["node"], ["node", "--source", "/data", "--data", "/data"]):
        with pytest.raises(ValueError):
            _node_location(argv)


def test_bad_source_urls_are_one_line_errors(tmp_path):
    assert is_source_url("dimse://A@h:104") and is_source_url("dicomweb+https://p/x") and not is_source_url("/d")
    for url in ("dicomweb+https://user:pw@pacs.example/dicom-web", "dimse://pacs:104", "dimse://AET@host",
                "dimse://AET@host:99999"):
        with pytest.raises(PacsError):
            open_pacs(url, cache_dir=tmp_path)
    res = subprocess.run([FEDRAD, "scan", "--source", "dicomweb+https://u:pw@pacs.example/x", "--cache",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "pw@" not in res.stderr
    res = subprocess.run([FEDRAD, "scan", "--source", "dimse://PACS@127.0.0.1:9", "--cache", str(tmp_path),
                          "--quiet"], capture_output=True, text=True, timeout=120)  # nothing listens on port 9
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.slow
def test_federated_round_with_one_site_reading_from_orthanc(pacs, tmp_path):
    """Real SuperLink + two SuperNodes: site 'pacs' reads over DIMSE from Orthanc, site 'folder' from a folder.
    The round completes with both sites, the PACS site's instances are in its own store, and nothing about
    the PACS (AE title, port, UIDs) is in what the sites sent (their audit logs)."""
    from federation_harness import Consortium

    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    server, kept, _auth = pacs
    folder_site = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=6,
                                        images_per_patient=(1, 3), size=64, seed=3)[0]
    c = Consortium(tmp_path / "fed")
    try:
        c.start_link()
        c.start_node("pacs", server.dimse_url)  # node config data-dir = the PACS URL (no credentials on DIMSE)
        c.start_node("folder", folder_site)
        run_dir = tmp_path / "run"
        code = c.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir),
                      "fraction-evaluate": 0.0})
    finally:
        c.stop()
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "fed" / "logs").glob("*.log"))
    assert code == 0, logs
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1] and rows[0]["sites_aggregated"] == 2, logs
    stored = list((tmp_path / "fed" / "cache" / "pacs" / "pacs").rglob("*.dcm"))
    assert {p.stem for p in stored} >= {_sop(p) for p in kept.iterdir()}
    sent = "".join(p.read_text(errors="replace") for p in (tmp_path / "fed" / "audit").rglob("*") if p.is_file())
    assert sent, "the sites' audit logs are empty"
    for secret in ["ORTHANC", "dimse://", "127.0.0.1", *(p.stem for p in stored)]:
        assert secret not in sent, secret
