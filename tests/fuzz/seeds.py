"""Seed corpus for the fuzz harnesses: the shared DICOMs' headers over small pixel data, in several codecs.

The shared films are 0.1-6 MB; mutating those spends the fuzzer's time decoding megapixels. So each shared
file is re-saved with its own header (photometric, windowing, LUTs, rescale, odd tags kept) over a 24x24 crop,
uncompressed and (where an encoder is installed) as RLE, JPEG 2000 and Pillow-encoded JPEG baseline; plus
synthetic seeds and the small hostile files. Deterministic: the same input data gives the same corpus.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: dicom_fixtures, hostile_dicom

CROP = 24


def _shared_dicoms() -> list[Path]:
    root = Path(os.environ.get("FEDRAD_SHARED_DATA") or HERE.parents[2] / "shared" / "data") / "dicom"
    return sorted(root.glob("*.dcm")) if root.is_dir() else []


def _small_variants(path: Path) -> dict[str, bytes]:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    out: dict[str, bytes] = {}
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception:  # noqa: BLE001 - no pixels / undecodable: keep the header with a tiny pixel block
        ds = pydicom.dcmread(path, force=True)
        arr = None
    if arr is None or arr.ndim != 2:
        buf = io.BytesIO()
        ds.save_as(buf)
        out["raw"] = buf.getvalue()[:65536]
        return out
    h, w = arr.shape
    crop = np.ascontiguousarray(arr[h // 2 : h // 2 + CROP, w // 2 : w // 2 + CROP])
    bits = 8 if crop.dtype.itemsize == 1 else 16
    ds.Rows, ds.Columns = crop.shape
    ds.BitsAllocated = bits
    ds.PixelData = crop.astype(np.uint8 if bits == 8 else crop.dtype).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for name, syntax in (("raw", None), ("rle", RLELossless), ("j2k", JPEG2000Lossless)):
        try:
            d = ds.copy()
            if syntax is not None:
                d.compress(syntax, crop)
            buf = io.BytesIO()
            d.save_as(buf, enforce_file_format=True)
            out[name] = buf.getvalue()
        except Exception:  # noqa: BLE001 - encoder not installed or refuses this depth
            pass
    if bits == 8:
        from PIL import Image
        from pydicom.encaps import encapsulate

        jpg = io.BytesIO()
        Image.fromarray(crop.astype(np.uint8)).save(jpg, format="JPEG", quality=90)
        d = ds.copy()
        d.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        d.PhotometricInterpretation = ds.PhotometricInterpretation
        d.PixelData = encapsulate([jpg.getvalue()])
        d["PixelData"].VR, d["PixelData"].is_undefined_length = "OB", True
        buf = io.BytesIO()
        d.save_as(buf, enforce_file_format=True)
        out["jpeg"] = buf.getvalue()
    return out


def build_dicom_seeds(out_dir: str | os.PathLike[str]) -> int:
    """Write the DICOM seed corpus into `out_dir`; returns the number of seeds."""
    from dicom_fixtures import small_dicom
    from hostile_dicom import make_hostile_folder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in _shared_dicoms():
        for kind, data in _small_variants(p).items():
            (out / f"{p.stem[:40]}-{kind}.dcm").write_bytes(data)
            n += 1
    tmp = out / ".gen"
    small_dicom(tmp / "gradient.dcm")
    small_dicom(tmp / "mono1.dcm", photometric="MONOCHROME1")
    hostile = tmp / "hostile"
    make_hostile_folder(hostile, unreadable_folder=False)
    for f in sorted([*tmp.glob("*.dcm"), *hostile.rglob("*.dcm")]):
        if f.is_file() and not f.is_symlink() and f.stat().st_size <= 65536:
            (out / f"gen-{len(list(out.glob('gen-*')))}.dcm").write_bytes(f.read_bytes())
            n += 1
    import shutil

    shutil.rmtree(tmp)
    return n


def build_png_seeds(out_dir: str | os.PathLike[str]) -> int:
    """Small PNG/JPEG seeds in the modes the image reader handles (L, I;16, RGB, LA, P)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = (np.arange(24 * 24).reshape(24, 24) % 251).astype(np.uint8)
    images = {
        "l.png": Image.fromarray(g), "i16.png": Image.fromarray(g.astype(np.uint16) * 200),
        "rgb.png": Image.fromarray(np.stack([g, g[::-1], g.T], -1)), "la.png": Image.fromarray(g).convert("LA"),
        "p.png": Image.fromarray(g).convert("P"), "l.jpg": Image.fromarray(g),
    }
    for name, im in images.items():
        im.save(out / name)
    return len(images)


if __name__ == "__main__":
    print(build_dicom_seeds(sys.argv[1]), build_png_seeds(sys.argv[2]) if len(sys.argv) > 2 else "")
