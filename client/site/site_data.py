"""A site's images as training data: decoded once through the cache, with weak labels and patient keys.

Two layouts are accepted, because that is what hospitals hand over:
* a DICOM folder, walked recursively with any file names (PACS exports often have no extension);
  header fields give weak labels (modality, body_part, view, sex, age bucket); an optional labels CSV
  (`file` relative path or `sop_uid`, plus label columns) adds site labels. A `labels.csv` with a `file`
  or `sop_uid` column inside the folder is picked up automatically.
* a PNG/JPEG folder with `manifest.csv` or `labels.csv` (`image` relative path, `patient_id`, label columns).
Raw patient IDs are turned into salted HMAC keys on the way in and never kept in SiteData.
Which layout a folder is, listing it and decoding an item belong to the readers in fedrad.common.sources;
this module joins their output with labels and patient keys.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedrad.common.cache import DecodedCache
from fedrad.common.data_rules import DataRules
from fedrad.common.header_signals import (
    UNKNOWN,
    age_bucket,
    contrast_label,
    load_site_salt,
    patient_key,
    plane_label,
)
from fedrad.common.intensity import preset_mask, series_affines
from fedrad.common.series import series_arrays
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.image_folder import IMAGE_EXTS, image_entry, read_csv
from fedrad.common.sources.layout import csv_columns, detect_source, open_location
from fedrad.common.sources.pacs import PacsOptions

if TYPE_CHECKING:
    import torch

HEADER_FIELDS = ("modality", "body_part", "view", "sex", "age", "plane", "contrast")
CACHE_DIRNAME = ".fedrad-cache"
__all__ = ["SiteData", "load_site", "detect_layout", "default_cache_dir", "site_salt", "read_csv",
           "csv_columns", "image_entry", "IMAGE_EXTS", "HEADER_FIELDS", "is_writable_dir"]


@dataclass
class SiteData:
    """Decoded images (uint16, value/65535 in [0, 1]) with aligned paths, patient keys and labels."""

    images: np.ndarray
    paths: list[str]
    patient_keys: list[str]
    labels: dict[str, list[str]]
    skipped: Counter = field(default_factory=Counter)
    image_size: int = 0
    # cross-sectional sampling (common/series.py): series id and position along its normal per image (None:
    # every image its own series), and the site's rules for a round's series share and slice spacing
    series_ids: np.ndarray | None = None
    slice_pos: np.ndarray | None = None
    rules: DataRules | None = None
    # intensity per modality (common/intensity.py): per-image (scale, offset) putting an MR slice on its
    # series' scale, and per CT image the bit mask of window presets a batch may show it with (0: not CT)
    affine: np.ndarray | None = None
    ct_mask: np.ndarray | None = None
    # images found but not decoded yet (left to `fedrad ingest`, see load_site's max_decode)
    pending: int = 0

    def __post_init__(self) -> None:
        # One string object per distinct label value and patient: decoded header fields arrive as a fresh
        # string per image (~55 B each), half of what a 10^6-image site held between rounds (issue 26).
        self.patient_keys = [sys.intern(k) for k in self.patient_keys]
        self.labels = {name: [sys.intern(v) for v in values] for name, values in self.labels.items()}

    def __len__(self) -> int:
        return len(self.paths)

    def label_ids(self, fields: Sequence[str]) -> np.ndarray:
        """int64 id per image of the combined label `fields` (equal strings -> equal id, sorted order)."""
        if not fields:
            return np.zeros(len(self), dtype=np.int64)
        missing = [f for f in fields if f not in self.labels]
        if missing:
            raise KeyError(f"unknown label field(s) {missing}; have {sorted(self.labels)}")
        combo = ["\x1f".join(self.labels[f][i] for f in fields) for i in range(len(self))]
        return _ids(combo)

    def group_ids(self) -> np.ndarray:
        """int64 id per image of its patient (images of one patient share an id)."""
        return _ids(self.patient_keys)

    def as_float(self, idx) -> torch.Tensor:
        """Images `idx` (int, slice, index array) as float32 [B, 1, S, S] in [0, 1]."""
        import torch

        arr = self.images[idx]
        if arr.ndim == 2:
            arr = arr[None]
        out = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        return out.mul_(1.0 / 65535.0).unsqueeze(1)

    def subset(self, idx: Sequence[int] | np.ndarray) -> SiteData:
        """A SiteData of the images `idx` (for patient-level splits); images are copied into memory."""
        idx = np.asarray(idx, dtype=np.int64)
        return SiteData(
            images=np.asarray(self.images[idx]),
            paths=[self.paths[i] for i in idx],
            patient_keys=[self.patient_keys[i] for i in idx],
            labels={k: [v[i] for i in idx] for k, v in self.labels.items()},
            skipped=Counter(self.skipped),
            image_size=self.image_size,
            series_ids=None if self.series_ids is None else self.series_ids[idx],
            slice_pos=None if self.slice_pos is None else self.slice_pos[idx],
            rules=self.rules,
            affine=None if self.affine is None else self.affine[idx],
            ct_mask=None if self.ct_mask is None else self.ct_mask[idx],
        )


def _ids(values: Sequence[str]) -> np.ndarray:
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    _, inv = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64).reshape(-1)


# -- discovery ------------------------------------------------------------------------------------
def detect_layout(data_dir: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """('images', manifest) for a PNG/JPEG folder with a manifest, else ('dicom', labels CSV or None).

    A thin wrapper of fedrad.common.sources.detect_source, kept for its callers."""
    layout = detect_source(data_dir)
    return layout.kind, layout.csv


def is_writable_dir(path: Path) -> bool:
    """Writable for us *and* not marked read-only: root bypasses permissions, but a folder with no write
    bit (e.g. a shared archive, r-x) was made read-only on purpose and must not get a cache inside it."""
    try:
        return path.is_dir() and bool(path.stat().st_mode & 0o222) and os.access(path, os.W_OK)
    except OSError:
        return False


def default_cache_dir(data_dir: str | os.PathLike[str]) -> Path:
    """`<data>/.fedrad-cache` when writable, else `~/.cache/fedrad/<hash of the absolute data path>`."""
    root = Path(data_dir).resolve()
    cand = root / CACHE_DIRNAME
    try:
        if not cand.is_dir() and not is_writable_dir(root):
            raise PermissionError(str(root))
        cand.mkdir(exist_ok=True)
        probe = cand / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return cand
    except OSError:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        digest = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:16]
        return base / "fedrad" / digest


def _norm_header_value(name: str, value: str) -> str:
    value = (value or "").strip()
    if not value:
        return UNKNOWN
    if name == "age":
        try:
            return age_bucket(float(value))
        except ValueError:
            return value if value in ("0-17", "18-39", "40-59", "60-79", "80+") else UNKNOWN
    value = value.upper()
    if name == "sex":
        return value[:1] if value[:1] in ("M", "F", "O") else UNKNOWN
    if name == "view" and value in ("LL", "RL", "LAT", "LATERAL"):
        return "LATERAL"
    return value


def _load_images(reader, image_size: int, cache: DecodedCache, progress: bool) -> SiteData:
    rows = reader.rows
    if rows and "image" not in rows[0]:
        raise ValueError(f"{reader.manifest}: needs an 'image' column")
    items = reader.list_items().items
    paths = [it.locator for it in items]
    images, kept, skipped = cache.load_items(items, progress=progress)
    extra = [c for c in (rows[0].keys() if rows else []) if c not in ("image", "patient_id", "")]
    labels: dict[str, list[str]] = {}
    for name in dict.fromkeys([*HEADER_FIELDS, *extra]):
        if name in HEADER_FIELDS:
            labels[name] = [_norm_header_value(name, rows[i].get(name, "")) for i in kept]
        else:
            labels[name] = [rows[i].get(name, "") for i in kept]
    labels.update(reader.csv_labels([paths[i] for i in kept]))  # a labels CSV the site added, if any
    keys = [patient_key(rows[i].get("patient_id", ""), f"image:{rows[i]['image']}", cache.salt) for i in kept]
    return SiteData(images=images, paths=[paths[i] for i in kept], patient_keys=keys, labels=labels,
                    skipped=Counter(skipped.values()), image_size=image_size)


# -- DICOM ---------------------------------------------------------------------------------------
def load_site(data_dir: str | os.PathLike[str], image_size: int, cache_dir: str | os.PathLike[str] | None = None,
              progress: bool = True, labels_csv: str | os.PathLike[str] | None = None,
              state_dir: str | os.PathLike[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              source_options: PacsOptions | None = None, rules: DataRules | None = None,
              max_decode: int | None = None) -> SiteData:
    """Load a site folder (DICOM tree or PNG/JPEG + manifest) through the decoded-image cache.

    `labels_csv` overrides a DICOM folder's auto-detected `<data>/labels.csv`, and adds label columns to a
    PNG/JPEG folder's manifest (the reader joins it: `Reader.csv_labels`); unlabelled images get ''.
    `state_dir`: the site state directory holding the salt (see header_signals.load_site_salt); `max_pixels`
    the pixel budget (files over it are skipped as too-large). Files found but unusable, including formats
    without a reader (NIfTI, archives), are counted in `SiteData.skipped` by reason.
    `data_dir` may be a PACS source URL (dicomweb+https://..., dimse://AET@host:port; `source_options` its
    query and limits): instances are pulled into the site's store and decoded like a DICOM folder.
    `rules` (the site policy's [data] rules, default DataRules()): DICOM images of a modality it excludes or
    with burned-in annotation are skipped with that reason; a frame of a multi-frame object is an image; CT/MR
    slices are grouped into series (series_ids, slice_pos) for the trainer's per-series sampling.
    `max_decode` (DICOM): when more files than this are not decoded yet, none is decoded here; the site uses
    what is stored and `SiteData.pending` counts the rest (a round never decodes a hospital's archive).
    Raises FileNotFoundError if the folder does not exist (the CLI turns that into exit code 2).
    """
    opened = open_location(data_dir, max_pixels, cache_dir, source_options, labels_csv)
    reader, root = opened.reader, opened.root
    cdir = opened.cache_dir or (Path(cache_dir) if cache_dir else default_cache_dir(root))
    cache = DecodedCache(cdir, image_size, decoder=reader.entry, state_dir=state_dir, max_pixels=max_pixels)
    if not reader.has_headers:  # labels and patients from the source's own table (a PNG/JPEG manifest)
        return _load_images(reader, image_size, cache, progress)

    listing = reader.list_items()
    rules = rules or DataRules()
    images, kept_items, skipped = cache.load_frames(listing.items, progress=progress,  # a frame is an image
                                                    accept=rules.refuse, max_decode=max_decode)
    metas = [cache.meta(it.item_id) for it in kept_items]
    series_ids, slice_pos, _series = series_arrays(metas)
    affine, ct_mask = _intensity(metas, series_ids)
    kept_paths = [it.locator for it in kept_items]
    labels: dict[str, list[str]] = {
        "modality": [m.get("modality") or UNKNOWN for m in metas],
        "body_part": [m.get("body_part") or UNKNOWN for m in metas],
        "view": [m.get("view") or UNKNOWN for m in metas],
        "sex": [_norm_header_value("sex", m.get("sex", "")) for m in metas],
        "age": [age_bucket(m.get("age_years")) for m in metas],
        "plane": [plane_label(m.get("orientation")) for m in metas],  # cross-sectional weak labels (SupCon)
        "contrast": [contrast_label(m.get("contrast"), m.get("modality")) for m in metas],
    }
    extra = reader.csv_labels(kept_paths, [m.get("sop_uid", "") for m in metas])  # the labels CSV, if any
    clash = set(extra) & set(labels)
    labels.update({(f"csv_{k}" if k in clash else k): v for k, v in extra.items()})
    keys = [m.get("patient_key") or UNKNOWN for m in metas]
    reasons = Counter(skipped.values())
    reasons.update(p.reason for p in listing.skipped)
    return SiteData(images=images, paths=kept_paths, patient_keys=keys, labels=labels,
                    skipped=reasons, image_size=image_size, series_ids=series_ids, slice_pos=slice_pos, rules=rules,
                    affine=affine, ct_mask=ct_mask, pending=cache.pending)


def _intensity(metas: list[dict], series_ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(MR series affines, CT preset masks) from the stored per-image intensity fields; None when unused."""
    ranges = np.array([m.get("value_range") or (np.nan, np.nan) for m in metas], dtype=np.float64).reshape(-1, 2)
    affine = series_affines(ranges[:, 0], ranges[:, 1], series_ids) if np.isfinite(ranges).any() else None
    ct = np.array([preset_mask(m.get("body_part", "")) if m.get("intensity") == "hu" else 0 for m in metas],
                  dtype=np.int16)
    return affine, (ct if ct.any() else None)


def site_salt(cache_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The site's pseudonymisation salt (the same one DecodedCache uses)."""
    return load_site_salt(cache_dir, state_dir)
