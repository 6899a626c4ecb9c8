"""Ingest at scale (issue 26): `fedrad ingest` throughput vs a bare pydicom loop, 1-file update, index RAM, start.

For N synthetic CR DICOMs (128x128, 16 bit; uncompressed and JPEG 2000 lossless), written as copies of 64
distinct images with their own UIDs and patients (every file is distinct content):
- ingest images/s (fedrad.client.site.ingest.ingest_site, image size 64, P decode workers) vs a bare
  `pydicom.dcmread(...).pixel_array` loop in a multiprocessing pool of the same P processes (goal >= 0.8x);
- adding 1 file to the N-image store: the store append alone (DecodedCache.ingest of the new item), and a whole
  `ingest` pass (walk + stat of N files + 1 decode) (goal <= 1 s at 10^5);
- index RAM: peak RSS growth of a fresh process checking all N items against the store (goal <= 100 MB at 10^5);
- node start: `load_site` of the N-image store, nothing to decode (time and peak RSS; goal <= 10 s at 10^5).
Run: python benchmarks/bench_ingest.py [--n 2000] [--workers P]   (the issue's size: --n 100000, ~1 h on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import append_result, machine, today  # noqa: E402

SIZE = 64
J2K = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)


def write_files(folder: Path, n: int, compressed: bool) -> list[Path]:
    """n DICOMs: 64 distinct images encoded once, saved with fresh UIDs and patient ids (distinct content)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cr = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    rng = np.random.default_rng(0)
    templates = []
    for k in range(64):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = cr
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality, ds.BodyPartExamined = cr, "CR", "CHEST"
        ds.Rows = ds.Columns = 128
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        yy, xx = np.mgrid[:128, :128]
        img = (2000 + 1500 * np.sin(xx / (7 + k)) * np.cos(yy / 9) + rng.normal(0, 40, (128, 128)))
        arr = np.clip(img, 0, 4095).astype(np.uint16)
        if compressed:
            ds.compress(J2K, arr, generate_instance_uid=False)
        else:
            ds.PixelData = arr.tobytes()
        templates.append(ds)
    paths = []
    for i in range(n):
        ds = templates[i % 64]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"P{i}"
        p = folder / f"d{i // 1000:03d}" / f"{i:07d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _bare(path: Path) -> int:
    import pydicom

    return int(pydicom.dcmread(path).pixel_array.shape[0])


def bare_rate(paths: list[Path], workers: int) -> float:
    t0 = time.perf_counter()
    ctx = get_context("spawn")
    with ctx.Pool(workers) as pool:  # OMP_NUM_THREADS is inherited from the environment
        for _ in pool.imap_unordered(_bare, paths, chunksize=16):
            pass
    return len(paths) / (time.perf_counter() - t0)


def _child(phase: str, data: str, cache: str, state: str) -> None:
    """Runs in a fresh process: prints {"seconds", "rss_mb" growth over the imports} as JSON."""
    import resource

    from fedrad.client.site.ingest import ingest_site
    from fedrad.client.site.site_data import load_site
    from fedrad.common.cache import INLINE_DECODE_MAX

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if phase == "index":
        out = ingest_site(data, SIZE, cache_dir=cache, state_dir=state, progress=False)
        assert out["decoded"] == 0, out
    else:
        site = load_site(data, SIZE, cache_dir=cache, state_dir=state, progress=False, max_decode=INLINE_DECODE_MAX)
        assert site.pending == 0
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": peak - rss0, "peak_mb": peak}))


def child(phase: str, data: Path, cache: Path, state: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", phase, str(data), str(cache), str(state)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(n: int, compressed: bool, workers: int, tmp: Path) -> str:
    from fedrad.client.site.ingest import ingest_site
    from fedrad.common.cache import DecodedCache
    from fedrad.common.sources.base import Item
    from fedrad.common.sources.dicom_folder import DicomFolderReader

    data, cache, state = tmp / "data", tmp / "cache", tmp / "state"
    t0 = time.perf_counter()
    paths = write_files(data, n, compressed)
    written = time.perf_counter() - t0
    bare = bare_rate(paths, workers)
    t0 = time.perf_counter()
    out = ingest_site(data, SIZE, cache_dir=cache, state_dir=state, progress=False, workers=workers)
    ingest = out["decoded"] / (time.perf_counter() - t0)
    assert out["decoded"] == n, out
    extra = write_files(tmp / "extra", 1, compressed)[0]
    new = data / "new" / "one.dcm"
    new.parent.mkdir()
    os.replace(extra, new)
    store = DecodedCache(cache, SIZE, decoder=DicomFolderReader.entry, workers=0, state_dir=state)
    t0 = time.perf_counter()
    store.ingest([Item("new/one.dcm", str(new))], progress=False)
    append_s = time.perf_counter() - t0
    store.close()
    new2 = data / "new" / "two.dcm"
    os.replace(write_files(tmp / "extra2", 1, compressed)[0], new2)
    t0 = time.perf_counter()
    ingest_site(data, SIZE, cache_dir=cache, state_dir=state, progress=False, workers=workers)
    pass_s = time.perf_counter() - t0
    index = child("index", data, cache, state)
    start = child("site", data, cache, state)
    kind = "JPEG 2000 lossless" if compressed else "uncompressed"
    print(f"{kind}: wrote {n} in {written:.0f} s; bare {bare:.0f}/s, ingest {ingest:.0f}/s ({ingest / bare:.2f}x); "
          f"append 1 {append_s:.3f} s, ingest pass +1 {pass_s:.2f} s; index check {index}; node start {start}")
    return (f"| {today()} | {n} | {kind} | {workers} | {bare:.0f} | {ingest:.0f} | {ingest / bare:.2f}x | "
            f"{append_s:.3f} | {pass_s:.2f} | +{index['rss_mb']:.0f} MB (peak {index['peak_mb']:.0f}) / "
            f"{index['seconds']:.1f} s | {start['seconds']:.1f} s / +{start['rss_mb']:.0f} MB (peak "
            f"{start['peak_mb']:.0f}) | {machine()} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="synthetic DICOMs per kind (issue 26's size: 100000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes, both sides")
    ap.add_argument("--kinds", default="uncompressed,j2k", help="uncompressed, j2k or both")
    ap.add_argument("--note", default="", help="load on the machine, appended to the row")
    args = ap.parse_args()
    header = ("| date | N | files | processes | bare pydicom img/s | ingest img/s | ratio (goal >= 0.8) | "
              "append 1 file s | ingest pass +1 file s | index check: RSS growth / time (goal <= 100 MB) | "
              "node load_site: time (goal <= 10 s) / RSS growth | machine | load |")
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            row = run(args.n, kind == "j2k", args.workers, Path(tmp))
        append_result("Ingest at scale (issue 26)", header, row + f" {args.note or 'not recorded'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
