"""Epoch over cached vs uncached decoding of compressed DICOMs (goal: cached >= 20x faster).

Uncached: every epoch decodes every file (pydicom + pylibjpeg), resizes, normalises.
Cached:   fedrad's DecodedCache, warm (decoded once earlier), reads the uint16 memmap into float tensors.
Both produce the same [N, 1, S, S] float batch. Run: python benchmarks/bench_cache.py [--size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import bench_command, record_row, shared_data  # noqa: E402

COMPRESSED = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.")  # RLE and every JPEG family syntax


def compressed_files(tmp: Path) -> tuple[list[Path], str]:
    from fedrad.common.dicom_io import SkipImage, read_header

    data = shared_data()
    files: list[Path] = []
    if data and (data / "dicom").is_dir():
        for p in sorted((data / "dicom").glob("*.dcm")):
            try:
                h = read_header(p)
            except SkipImage:
                continue
            if h.transfer_syntax.startswith(COMPRESSED) and "KNOWNBAD" not in p.name:
                files.append(p)
        source = "shared/data/dicom (real CR, compressed)"
    if not files:
        from fedrad.deploy.synthetic import write_synthetic_sites

        site = write_synthetic_sites(tmp / "sites", n_sites=3, patients_per_site=10, size=512)[2]
        files = [p for p in site.rglob("*") if p.is_file() and p.suffix != ".csv"]
        source = "synthetic site-c (RLE + JPEG 2000, 512 px)"
    return files, source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    import torch

    from fedrad.common.cache import DecodedCache
    from fedrad.common.dicom_io import SkipImage, decode_dicom

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        files, source = compressed_files(tmp)
        cache = DecodedCache(tmp / "cache", args.size, workers=1)
        t0 = time.perf_counter()
        cache.load(files, progress=False)  # the one-time decode, not timed in the epochs below
        first_fill = time.perf_counter() - t0

        def uncached_epoch() -> torch.Tensor:
            imgs = []
            for p in files:
                try:
                    imgs.append(decode_dicom(p, args.size))
                except SkipImage:
                    continue
            return torch.from_numpy(np.stack(imgs))[:, None]

        def cached_epoch() -> torch.Tensor:
            images, kept, _ = DecodedCache(tmp / "cache", args.size, workers=1).load(files, progress=False)
            return torch.from_numpy(np.asarray(images, dtype=np.float32) / 65535.0)[:, None]

        def timed(fn) -> float:
            best = float("inf")
            for _ in range(args.epochs):
                t = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t)
            assert out.shape[0] > 0
            return best

        a, b = uncached_epoch(), cached_epoch()
        max_diff = float((a - b).abs().max())
        t_uncached = timed(uncached_epoch)
        t_cached = timed(cached_epoch)
    ratio = t_uncached / t_cached
    print(f"{'files':>6} {'px':>5} {'uncached s/epoch':>17} {'cached s/epoch':>15} {'speed-up':>9}  source")
    print(f"{len(files):>6} {args.size:>5} {t_uncached:>17.4f} {t_cached:>15.5f} {ratio:>8.1f}x  {source}")
    print(f"first fill of the cache: {first_fill:.2f}s; max |uncached - cached| = {max_diff:.2e} "
          "(uint16 quantisation)")
    ctx = {"command": bench_command(__file__), "files": len(files), "px": args.size, "source": source}
    record_row("cache", "uncached s/epoch", round(t_uncached, 4), "s/epoch", **ctx)
    record_row("cache", "cached s/epoch", round(t_cached, 5), "s/epoch", **ctx)
    record_row("cache", "speed-up", round(ratio, 1), "x", **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
