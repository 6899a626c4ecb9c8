"""Cross-sectional decode throughput and memory (issue 27).

1. Frames/s of fedrad's decode (decode_item: every frame, functional groups, colour -> luminance, intensity,
   resize to 128 px) against a bare pydicom loop (dcmread + iter_pixels, nothing else) over the same files:
   the shared CT/MR/US files of dicom_xsec, and a synthetic 512 x 512 x N-slice CT series (default 300).
2. Peak RSS of a child process decoding a synthetic 2,000-frame 512 x 512 enhanced CT (1 GB of pixel data,
   written by streaming frames, so the writer never holds it either): goal <= 1 GB, i.e. never the object.

Run: python benchmarks/bench_xsec_decode.py [--shared DIR] [--slices 300] [--frames 2000] [--repeat 2]
Prints markdown rows and records them in benchmarks/results/xsec_decode.jsonl (`--no-record`: print only).
"""

from __future__ import annotations

import argparse
import csv
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common_bench import bench_command, record_row  # noqa: E402

SIZE = 128


def _bare(paths: list[Path]) -> int:
    import pydicom
    from pydicom.pixels import iter_pixels

    n = 0
    for p in paths:
        ds = pydicom.dcmread(p, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        for _ in iter_pixels(ds):
            n += 1
    return n


def _fedrad(paths: list[Path]) -> int:
    from fedrad.common.dicom_io import decode_item

    n = 0
    for p in paths:
        img, _h = decode_item(p, SIZE)
        n += len(img.index) if hasattr(img, "index") else 1
    return n


def _rate(fn, paths: list[Path], repeat: int) -> tuple[float, int]:
    fn(paths[:2])  # imports and plugin discovery out of the timing
    best, frames = 0.0, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        frames = fn(paths)
        best = max(best, frames / (time.perf_counter() - t0))
    return best, frames


def _ct_slice(path: Path, k: int, rows: int, series: str, study: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "BENCH", study, series
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 1.25 * k], [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = k + 1
    yy, xx = np.mgrid[:rows, :rows]
    body = ((yy - rows / 2) ** 2 + (xx - rows / 2) ** 2) < (0.4 * rows) ** 2
    hu = np.where(body, 40, -1000) + ((xx + k) % 50 == 0) * 700
    ds.PixelData = hu.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_enhanced(path: Path, frames: int, rows: int) -> None:
    """An Enhanced CT of `frames` frames, the pixel data streamed after a pydicom-written header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "BENCH", generate_uid(), generate_uid()
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = frames
    shared, pvt = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, 0, "HU"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(frames):
        g, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, 0.625 * k]
        g.PlanePositionSequence = Sequence([pos])
        per.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.save_as(path, enforce_file_format=True)
    nbytes = frames * rows * rows * 2
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes))
        yy, xx = np.mgrid[:rows, :rows]
        for k in range(frames):
            f.write((np.where(((yy - rows / 2) ** 2 + (xx - rows / 2) ** 2) < (0.4 * rows) ** 2, 40, -1000)
                     + (xx + k) % 200).astype(np.int16).tobytes())


def peak_rss_child(path: Path) -> tuple[float, int, float]:
    """(peak RSS MiB, frames decoded, seconds) of a fresh process decoding `path` with decode_item."""
    code = ("import resource, sys, time; from fedrad.common.dicom_io import decode_item; t = time.perf_counter(); "
            f"f, h = decode_item(sys.argv[1], {SIZE}); s = time.perf_counter() - t; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(f.index), s)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    rss, n, secs = out.stdout.split()
    return float(rss), int(n), float(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("FEDRAD_SHARED_DATA", "../shared/data"))
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="print only; record no rows")
    args = ap.parse_args()

    def record(metric: str, value: float, unit: str, **extra) -> None:
        if not args.no_record:
            record_row("xsec_decode", metric, value, unit, command=bench_command(__file__), **extra)

    def record_rates(name: str, frames: int, bare: float, ours: float) -> None:
        record(f"{name} bare pydicom frames/s", round(bare), "frames/s", frames=frames)
        record(f"{name} fedrad frames/s", round(ours), "frames/s", frames=frames)
        record(f"{name} ratio", round(ours / bare, 2), "x", goal=">= 0.8", met=ours / bare >= 0.8, frames=frames)

    rows = ["| set | images (frames) | bare pydicom frames/s | fedrad frames/s | ratio |", "|---|---|---|---|---|"]
    index = Path(args.shared) / "dicom_xsec" / "INDEX.csv"
    if index.is_file():
        with open(index, newline="") as f:
            shared = [index.parent / r["file"] for r in csv.DictReader(f) if r["modality"] in ("CT", "MR", "US")]
        bare, n = _rate(_bare, shared, args.repeat)
        ours, _ = _rate(_fedrad, shared, args.repeat)
        rows.append(f"| shared dicom_xsec CT/MR/US ({len(shared)} files) | {n} | {bare:.0f} | {ours:.0f} | "
                    f"{ours / bare:.2f}x |")
        record_rates(f"shared dicom_xsec CT/MR/US ({len(shared)} files)", n, bare, ours)
    with tempfile.TemporaryDirectory(prefix="fedrad-xsec-bench-") as tmp:
        from pydicom.uid import generate_uid

        series, study = generate_uid(), generate_uid()
        paths = []
        for k in range(args.slices):
            paths.append(Path(tmp) / f"s{k:04d}.dcm")
            _ct_slice(paths[-1], k, args.rows, series, study)
        bare, n = _rate(_bare, paths, args.repeat)
        ours, _ = _rate(_fedrad, paths, args.repeat)
        rows.append(f"| synthetic CT series {args.rows}x{args.rows} x {args.slices} slices | {n} | {bare:.0f} | "
                    f"{ours:.0f} | {ours / bare:.2f}x |")
        record_rates(f"synthetic CT series {args.rows}x{args.rows} x {args.slices} slices (uncompressed)", n, bare,
                     ours)
        for p in paths:
            p.unlink()
        big = Path(tmp) / "enhanced.dcm"
        write_enhanced(big, args.frames, args.rows)
        rss, n, secs = peak_rss_child(big)
        rows += ["", "| object | file | frames decoded | peak RSS of the decoding process | seconds |",
                 "|---|---|---|---|---|",
                 f"| synthetic Enhanced CT {args.rows}x{args.rows} x {args.frames} frames | "
                 f"{big.stat().st_size / 2**20:.0f} MiB | {n} | {rss:.0f} MiB | {secs:.1f} |"]
        obj = f"synthetic Enhanced CT {args.rows}x{args.rows} x {args.frames} frames (uncompressed)"
        size = f"{big.stat().st_size / 2**20:.0f} MiB"
        record(f"{obj} peak RSS of the decoding process", round(rss), "MiB", goal="<= 1 GB (never the object)",
               met=rss <= 1024, file=size, frames_decoded=n)
        record(f"{obj} seconds", round(secs, 1), "s", file=size, frames_decoded=n)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
