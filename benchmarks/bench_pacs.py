"""Images per second pulled and decoded from a PACS (a real Orthanc on loopback) vs read from a folder.

The shared DICOMs Orthanc keeps (one per SOP Instance UID) are copied `--copies` times with fresh SOP
Instance UIDs, written to a folder and uploaded to Orthanc. Each path then loads the site cold (empty store,
empty cache) through `load_site` at `--size` px: the folder path decodes the files; the PACS paths list them
(QIDO-RS / C-FIND), fetch them (WADO-RS / C-GET) into the site store, and decode the stored files the same way.
Run: python benchmarks/bench_pacs.py [--copies 8 --size 128 --concurrency 2 --rate 1000]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import bench_command, record_row, shared_data  # noqa: E402


def _copies(files: list[Path], copies: int, out: Path) -> list[bytes]:
    import pydicom
    from pydicom.uid import generate_uid

    blobs = []
    for k in range(copies):
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f.name, str(k)])
            if "MediaStorageSOPInstanceUID" in ds.file_meta:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf)
            blobs.append(buf.getvalue())
            (out / f"{k:03d}_{f.name}").write_bytes(buf.getvalue())
    return blobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1000.0, help="PACS requests/s limit (the site default is 20)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from orthanc_server import find_orthanc, start_orthanc

    from fedrad.client.site.site_data import load_site
    from fedrad.common.sources.pacs import PacsOptions

    exe, why = find_orthanc()
    data = shared_data()
    if exe is None or data is None:
        print(f"skipped: {why or 'shared data not found'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = start_orthanc(tmp / "orthanc")
        try:
            import pydicom

            probe = tmp / "probe"
            by_sop: dict[str, Path] = {}
            for f in sorted((data / "dicom").glob("*.dcm")):  # one file per SOP Instance UID, as a PACS keeps
                by_sop.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f)
            kept = list(by_sop.values())
            folder = tmp / "folder"
            folder.mkdir()
            for blob in _copies(kept, args.copies, folder):
                server.upload(blob)
            n = len(list(folder.iterdir()))
            opts = PacsOptions(concurrency=args.concurrency, rate=args.rate, max_instances=100_000)
            rows = {}
            for name, where in (("folder", folder), ("dicomweb", server.dicomweb_url), ("dimse", server.dimse_url)):
                t0 = time.perf_counter()
                site = load_site(where, args.size, cache_dir=probe / name, progress=False,
                                 source_options=None if name == "folder" else opts)
                rows[name] = (time.perf_counter() - t0, len(site))
                print(f"{name:>9}: {n} files, {len(site)} usable, {rows[name][0]:.1f} s, "
                      f"{n / rows[name][0]:.1f} files/s", flush=True)
            fetch = {}
            for name, url in (("dicomweb", server.dicomweb_url), ("dimse", server.dimse_url)):
                from fedrad.common.sources.layout import open_pacs

                reader = open_pacs(url, cache_dir=probe / f"fetch-{name}", options=opts)
                reader.list_items()
                fetch[name] = reader.pull.list_seconds + reader.pull.fetch_seconds
                print(f"{name:>9}: pull only {fetch[name]:.1f} s ({n / fetch[name]:.1f} instances/s)", flush=True)
        finally:
            server.stop()
    if not args.no_record:
        ctx = {"command": bench_command(__file__), "files": n, "px": args.size}
        record_row("pacs", "folder files/s", round(n / rows["folder"][0], 1), "files/s", **ctx)
        record_row("pacs", "DICOMweb pull+decode files/s", round(n / rows["dicomweb"][0], 1), "files/s", **ctx)
        record_row("pacs", "DIMSE pull+decode files/s", round(n / rows["dimse"][0], 1), "files/s", **ctx)
        record_row("pacs", "DICOMweb pull only inst/s", round(n / fetch["dicomweb"], 1), "inst/s", **ctx)
        record_row("pacs", "DIMSE pull only inst/s", round(n / fetch["dimse"], 1), "inst/s", **ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
