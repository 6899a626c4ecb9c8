"""Which kind of source a folder is, decided in one place for site data, scan and fine-tuning.

A folder with `manifest.csv` or `labels.csv` holding an `image` column is a PNG/JPEG folder; anything else
is a DICOM folder (whose `labels.csv` with a `file` or `sop_uid` column, if any, adds labels). A new source
kind adds its test here and its reader module beside this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedrad.common.sources.base import Reader, csv_columns
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from fedrad.common.sources.pacs import PacsOptions, PacsReader

MANIFEST_NAMES = ("manifest.csv", "labels.csv")


@dataclass(frozen=True)
class Layout:
    """`kind` is 'dicom' or 'images'; `csv` the manifest (images) or the auto-detected labels CSV (dicom)."""

    kind: str
    csv: Path | None


def detect_source(folder: str | os.PathLike[str]) -> Layout:
    """The layout of a site folder (see the module docstring)."""
    root = Path(folder)
    for name in MANIFEST_NAMES:
        p = root / name
        if p.is_file() and "image" in csv_columns(p):
            return Layout("images", p)
    p = root / "labels.csv"
    if p.is_file() and {"file", "sop_uid"} & set(csv_columns(p)):
        return Layout("dicom", p)
    return Layout("dicom", None)


def open_source(folder: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                layout: Layout | None = None, labels_csv: str | os.PathLike[str] | None = None, **pacs) -> Reader:
    """The reader for a site folder, chosen by `detect_source` (or the `layout` already detected), or for a
    PACS source URL (`pacs`: cache_dir, options; see open_pacs). `labels_csv`: a labels CSV the site names (a
    DICOM folder's own `labels.csv` is found by detect_source); the reader joins it (`Reader.csv_labels`)."""
    from fedrad.common.sources.dicom_folder import DicomFolderReader
    from fedrad.common.sources.image_folder import ImageFolderReader
    from fedrad.common.sources.pacs import is_source_url

    if is_source_url(str(folder)):
        return open_pacs(str(folder), max_pixels, **pacs)

    layout = layout or detect_source(folder)
    if layout.kind == "images":
        return ImageFolderReader(folder, layout.csv, max_pixels, labels_csv)
    return DicomFolderReader(folder, max_pixels, labels_csv or layout.csv)


@dataclass(frozen=True)
class OpenedSource:
    """A site location opened for reading: its reader, the folder holding its files (a PACS: the site store),
    its layout, whether it is a PACS, and the cache folder a PACS keeps its store in (None for a folder)."""

    reader: Reader
    root: Path
    layout: Layout
    is_pacs: bool
    cache_dir: Path | None


def open_location(location: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                  cache_dir: str | os.PathLike[str] | None = None, options=None,
                  labels_csv: str | os.PathLike[str] | None = None) -> OpenedSource:
    """A folder or a PACS source URL, opened the one way site data and scan both need.

    Raises FileNotFoundError for a folder that does not exist (the CLI turns it into exit code 2)."""
    from fedrad.common.sources.pacs import default_source_cache_dir, is_source_url

    if is_source_url(str(location)):
        cdir = Path(cache_dir) if cache_dir else default_source_cache_dir(str(location))
        reader = open_source(str(location), max_pixels, cache_dir=cdir, options=options)
        reader.labels_csv = Path(labels_csv) if labels_csv else None  # joined by SOP Instance UID or file
        return OpenedSource(reader, reader.root, Layout("dicom", None), True, cdir)
    root = Path(location).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {location}")
    layout = detect_source(root)
    return OpenedSource(open_source(root, max_pixels, layout, labels_csv), root, layout, False, None)


def open_pacs(url: str, max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike[str] | None = None,
              options: PacsOptions | None = None) -> PacsReader:
    """The reader for a PACS source URL (see pacs.SCHEMES); its store lives under `cache_dir`.

    Here, not in pacs.py: the DIMSE and DICOMweb readers build on pacs.py, so the dispatch to them sits above
    all three (no import circle)."""
    from fedrad.common.sources.pacs import SCHEMES, PacsError, default_source_cache_dir

    cdir = Path(cache_dir) if cache_dir else default_source_cache_dir(url)
    if url.lower().startswith("dimse://"):
        from fedrad.common.sources.dimse import DimseReader

        return DimseReader(url, cdir, options, max_pixels)
    if url.lower().startswith(("dicomweb+http://", "dicomweb+https://")):
        from fedrad.common.sources.dicomweb import DicomWebReader

        return DicomWebReader(url, cdir, options, max_pixels)
    raise PacsError(f"not a PACS source: use {', '.join(s + '...' for s in SCHEMES)}")
