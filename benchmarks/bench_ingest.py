"""Ingest at scale (issue 26): `fedrad ingest` throughput vs a bare pydicom loop, 1-file update, index RAM, start.

For N synthetic CR DICOMs (128x128, 16 bit; uncompressed and JPEG 2000 lossless), written as copies of 64
distinct images with their own UIDs and patients (every file is distinct content):
- ingest images/s (fedrad.client.site.ingest.ingest_site, image size 64, P decode workers) vs a bare
  `pydicom.dcmread(...).pixel_array` loop in a multiprocessing pool of the same P processes (goal >= 0.8x);
- adding 1 file to the N-image store: the store append alone (DecodedCache.ingest of the new item), and a whole
  `ingest` pass, quick (folders unchanged since the last pass are not listed) and `--full` (walk + stat of N
  files + 1 decode) (goal <= 1 s at 10^5);
- index RAM: peak RSS growth of a fresh process checking all N items against the store (goal <= 100 MB at 10^5);
- node start: `load_site` of the N-image store, nothing to decode (time and peak RSS; goal <= 10 s at 10^5).
Run: python benchmarks/bench_ingest.py [--n 2000] [--workers P] [--dir D [--keep-store]] [--note LOAD]
(the issue's size: --n 100000, ~1 h on 2 cores; --dir keeps the synthetic folder for the next run). Each
measurement is one JSON line in benchmarks/results/ingest.jsonl; prose in benchmarks/notes/ingest.md.
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
from common_bench import bench_command, record_row  # noqa: E402

SIZE = 64
J2K = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)


def write_files(folder: Path, n: int, compressed: bool, side: int = 128) -> list[Path]:
    """n DICOMs of side x side pixels: 64 distinct images encoded once, saved with fresh UIDs and patient ids
    (every file is distinct content)."""
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
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        yy, xx = np.mgrid[:side, :side] * (128 / side)
        img = (2000 + 1500 * np.sin(xx / (7 + k)) * np.cos(yy / 9) + rng.normal(0, 40, (side, side)))
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


def _child(phase: str, data: str, cache: str, state: str, size: str = str(SIZE)) -> None:
    """Runs in a fresh process: prints {"seconds", "rss_mb" growth over the imports} as JSON."""
    import resource

    from fedrad.client.site.ingest import ingest_site
    from fedrad.client.site.site_data import load_site
    from fedrad.common.cache import INLINE_DECODE_MAX

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if phase == "index":
        out = ingest_site(data, int(size), cache_dir=cache, state_dir=state, progress=False, full=True)
        assert out["decoded"] == 0, out
    else:
        site = load_site(data, int(size), cache_dir=cache, state_dir=state, progress=False,
                         max_decode=INLINE_DECODE_MAX)
        assert site.pending == 0
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_s": time.process_time() - cpu0, "rss_mb": peak - rss0, "peak_mb": peak}))


def child(phase: str, data: Path, cache: Path, state: Path, size: int = SIZE) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", phase, str(data), str(cache), str(state), str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(metric: str, value, unit: str, goal: str | None, met: bool | None, note: str, **extra) -> None:
    """One row in benchmarks/results/ingest.jsonl."""
    row = record_row("ingest", metric, value, unit, command=bench_command(__file__), goal=goal, met=met, note=note,
                     **extra)
    print(json.dumps(row))


def _add(data: Path, tmp: Path, name: str, compressed: bool) -> Path:
    new = data / "new" / name
    new.parent.mkdir(exist_ok=True)
    os.replace(write_files(tmp / f"extra-{name}", 1, compressed)[0], new)
    return new


def run(n: int, compressed: bool, workers: int, tmp: Path, keep_store: bool, note: str, side: int = 128,
        size: int = SIZE) -> None:
    """The measurements, each recorded as it is made. `tmp` may hold the folder of an earlier run (reused)."""
    import shutil

    from fedrad.client.site.ingest import ingest_site
    from fedrad.common.cache import DecodedCache
    from fedrad.common.sources.base import Item
    from fedrad.common.sources.dicom_folder import DicomFolderReader

    kind = "JPEG 2000 lossless" if compressed else "uncompressed"
    data, cache, state = tmp / "data", tmp / "cache", tmp / "state"
    marker = tmp / f"written-{n}"
    kind = f"{kind} {side}x{side} -> {size} px" if (side, size) != (128, SIZE) else kind
    extra = {"n": n, "files": kind, "processes": workers}
    shutil.rmtree(data / "new", ignore_errors=True)
    if not marker.exists():
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        write_files(data, n, compressed, side)
        marker.write_text(kind)
    if not keep_store or not cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
        bare = bare_rate(sorted(data.rglob("*.dcm")), workers)
        t0 = time.perf_counter()
        out = ingest_site(data, size, cache_dir=cache, state_dir=state, progress=False, workers=workers)
        ingest = out["decoded"] / (time.perf_counter() - t0)
        assert out["decoded"] == n, out
        record("ingest_vs_bare_pydicom", round(ingest / bare, 3), "x", ">= 0.8x", ingest / bare >= 0.8,
               f"{kind}: bare pydicom pool {bare:.0f} img/s, fedrad ingest {ingest:.0f} img/s; {note}",
               bare_img_s=round(bare, 1), ingest_img_s=round(ingest, 1), **extra)
    start = child("site", data, cache, state, size)  # first: the store is whole, nothing pending
    record("node_start_s", round(start["seconds"], 2), "s", "<= 10 s at 1e5",
           start["seconds"] <= 10 if n >= 1e5 else None,
           f"{kind}: load_site of the {n}-image store in a fresh process, nothing to decode; its own CPU time "
           f"{start.get('cpu_s', float('nan')):.1f} s (wall time is that plus waiting for a core); RSS growth "
           f"{start['rss_mb']:.0f} MB (peak {start['peak_mb']:.0f}); {note}", rss_growth_mb=round(start["rss_mb"], 1),
           cpu_s=round(start.get("cpu_s", float("nan")), 2), **extra)
    new = _add(data, tmp, "one.dcm", compressed)
    store = DecodedCache(cache, size, decoder=DicomFolderReader.entry, workers=0, state_dir=state)
    t0 = time.perf_counter()
    store.ingest([Item("new/one.dcm", str(new))], progress=False)
    append_s = time.perf_counter() - t0
    store.close()
    record("append_1_file_store_s", round(append_s, 3), "s", "<= 1 s at 1e5", append_s <= 1 if n >= 1e5 else None,
           f"{kind}: DecodedCache.ingest of one new file into the {n}-image store; {note}", **extra)
    for mode, full in (("quick", False), ("full", True)):
        _add(data, tmp, f"two-{mode}.dcm", compressed)
        t0 = time.perf_counter()
        out = ingest_site(data, size, cache_dir=cache, state_dir=state, progress=False, workers=workers, full=full)
        pass_s = time.perf_counter() - t0
        assert out["decoded"] == 1, out
        record(f"ingest_pass_plus_1_file_{mode}_s", round(pass_s, 3), "s", "<= 1 s at 1e5" if not full else None,
               (pass_s <= 1 if n >= 1e5 else None) if not full else None,
               f"{kind}: `fedrad ingest` {'--full ' if full else ''}pass picking up 1 new file "
               f"({out['files']} files listed, {out['folders_unchanged']} unchanged folders skipped); {note}", **extra)
    index = child("index", data, cache, state, size)
    record("index_check_rss_growth_mb", round(index["rss_mb"], 1), "MB", "<= 100 MB at 1e5",
           index["rss_mb"] <= 100 if n >= 1e5 else None,
           f"{kind}: peak RSS growth of a fresh process checking all {n} files against the index (a full pass, "
           f"nothing to decode) over its imports; peak {index['peak_mb']:.0f} MB, {index['seconds']:.1f} s; {note}",
           **extra)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="synthetic DICOMs per kind (issue 26's size: 100000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes, both sides")
    ap.add_argument("--kinds", default="uncompressed,j2k", help="uncompressed, j2k or both")
    ap.add_argument("--dir", default=None, help="keep the synthetic folder here and reuse it next time "
                    "(<dir>/<kind>/data; default: a temporary folder)")
    ap.add_argument("--keep-store", action="store_true", help="with --dir: reuse its store, whole and ingested by a "
                    "full pass (no throughput row)")
    ap.add_argument("--side", type=int, default=128, help="pixels per side of the synthetic files (512: a CT slice)")
    ap.add_argument("--size", type=int, default=SIZE, help="image size the store keeps (the recipe's image size)")
    ap.add_argument("--note", default="", help="what else ran on the machine, added to each row's note")
    args = ap.parse_args()
    for kind in args.kinds.split(","):
        if args.dir:
            folder = Path(args.dir) / kind
            folder.mkdir(parents=True, exist_ok=True)
            run(args.n, kind == "j2k", args.workers, folder, args.keep_store, args.note, args.side, args.size)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run(args.n, kind == "j2k", args.workers, Path(tmp), False, args.note, args.side, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
