"""A PNG/JPEG folder described by a CSV (`manifest.csv` or `labels.csv` with an `image` column).

Each CSV row is one item (`image` = path relative to the folder, the item id); `patient_id` and the other
columns are labels the site loader reads from `rows`. The decoder lives here: 8-bit /255, 16-bit min-max,
colour -> luminance, with Pillow's own size read from the file header checked against the pixel budget
before any pixels are decoded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from fedrad.common.header_signals import patient_key
from fedrad.common.image_ops import fit_square
from fedrad.common.sources.base import Item, Listing, Reader, csv_columns, read_csv
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS, check_pixel_budget
from fedrad.common.sources.errors import SkipImage, reraise_fatal, skip_from
from fedrad.common.sources.inventory import Inventory, counts, usable
from fedrad.common.sources.walk import display_name, walk_folder

IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


def _open(path: str | bytes, max_pixels: int):
    """Pillow image with only its header read, after the pixel budget check. `path` may be the bytes."""
    import io

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path)  # header only
    w, h = im.size
    bands = len(im.getbands())
    check_pixel_budget(h, w, 1, bands, 16 if im.mode.startswith("I") else 8, max_pixels)
    return im


def image_entry(path: str | bytes, size: int, salt: bytes = b"", max_pixels: int = DEFAULT_MAX_PIXELS,
                ) -> tuple[np.ndarray, dict]:
    """Decoder for PNG/JPEG files (cache worker): 8-bit /255, 16-bit min-max, colour -> luminance."""
    try:
        with _open(path, max_pixels) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except SkipImage:
        raise
    except BaseException as exc:  # noqa: BLE001 - Pillow raises many types on hostile files; the contract is SkipImage
        reraise_fatal(exc)
        if type(exc).__name__ in ("DecompressionBombError", "DecompressionBombWarning"):
            raise SkipImage("too-large", " ".join(str(exc).split())[:200]) from None
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise SkipImage("unreadable", str(exc)[:200]) from None
        raise SkipImage("decode-failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]) from None
    if arr.ndim != 2 or arr.size == 0:
        raise SkipImage("bad-dimensions", f"shape {arr.shape}")
    if float(arr.max()) - float(arr.min()) < 1e-6:
        raise SkipImage("blank", "every pixel has the same value")
    try:
        return fit_square(arr, size), {}
    except BaseException as exc:  # noqa: BLE001
        reraise_fatal(exc)
        raise skip_from(exc, "resize") from None


def image_check(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The file exists, Pillow recognises its header, and its size is within budget."""
    if not os.path.isfile(path):
        raise SkipImage("unreadable", "listed in the manifest but not found")
    try:
        with _open(path, max_pixels) as im:
            return {"rows": im.size[1], "cols": im.size[0], "mode": im.mode}
    except SkipImage:
        raise
    except BaseException as exc:  # noqa: BLE001
        reraise_fatal(exc)
        raise skip_from(exc, "header") from None


class ImageFolderReader(Reader):
    """The rows of a manifest CSV; item id = the row's `image` path, `rows[i]` its label columns."""

    kind = "images"
    has_headers = False  # labels and patients come from the manifest's rows
    entry = staticmethod(image_entry)
    check = staticmethod(image_check)

    def __init__(self, root: str | os.PathLike[str], manifest: str | os.PathLike[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS, labels_csv: str | os.PathLike[str] | None = None) -> None:
        super().__init__(max_pixels, labels_csv)
        self.root = Path(root).resolve()
        self.manifest = Path(manifest)
        self.rows = read_csv(self.manifest)

    def _csv_layout(self, header: list[str]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        key = "image" if "image" in header else "file"
        return (key,), (key, "patient_id"), "an 'image' or 'file' column for a PNG/JPEG folder"

    def list_items(self) -> Listing:
        out = Listing(files_seen=len(self.rows))
        for r in self.rows:
            rel = r.get("image", "")
            out.items.append(Item(rel, str((self.root / rel).resolve())))
        return out

    def inventory(self, listing: Listing, results: list[dict], salt: bytes) -> Inventory:
        """The folder's files, its manifest, the PNG/JPEG files the manifest does not list, and the counts of
        each label column with at most 20 values; patients from the manifest's `patient_id` column."""
        walk = walk_folder(self.root)
        ok, rows = usable(results), self.rows
        listed = {it.locator for it in listing.items}
        label_cols = [c for c in csv_columns(self.manifest) if c not in ("image", "patient_id")]
        report = {
            "files_seen": len(walk.files),
            "manifest": self.manifest.name,
            "not_in_manifest": sum(1 for p in walk.files if str(p) not in listed and p != self.manifest
                                   and p.suffix.lower() in IMAGE_EXTS),
            "labels": {display_name(c): counts(rows[i].get(c, "") for i in ok) for c in label_cols
                       if len({rows[i].get(c, "") for i in ok}) <= 20},
            "candidates": len(rows),
            "ignored": [],
        }
        patients = [patient_key(rows[i].get("patient_id", ""), f"image:{rows[i].get('image', '')}", salt) for i in ok]
        return Inventory(report, patients, walk.folders)
