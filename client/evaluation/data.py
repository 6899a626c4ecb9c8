"""Labelled images for fine-tuning: a MedMNIST .npz or a site folder (DICOM or PNG + CSV), binary targets.

Every image carries a patient group (each image its own patient when unknown), so splits can keep a
patient's images together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRUE_VALUES = {"1", "true", "yes", "y", "positive", "pos", "t"}
FALSE_VALUES = {"0", "false", "no", "n", "negative", "neg", "f"}


@dataclass
class LabelledSet:
    """Images with binary targets and patient groups, plus the official split if the data has one."""

    images: np.ndarray  # float32 [N, S, S] in [0, 1]
    y: np.ndarray  # float32 [N, T] in {0, 1}
    targets: list[str]
    groups: np.ndarray  # int64 [N] patient id (each image its own patient when unknown)
    split: dict[str, np.ndarray] | None = None  # "train"/"test" (and "val") indices
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)



def binarise(columns: dict[str, list[str]]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """String label columns -> (y [N, T] float32, target names, usable-row mask).

    Binary columns (0/1, true/false, or exactly two values: the later one in sort order is positive) give
    one target; a column with more values becomes one-vs-rest targets `col=value`. '' means unlabelled.
    """
    ys, names = [], []
    n = len(next(iter(columns.values())))
    mask = np.ones(n, dtype=bool)
    for col, values in columns.items():
        vals = [v.strip() for v in values]
        mask &= np.array([v != "" for v in vals])
        distinct = sorted({v for v in vals if v})
        low = {v.lower() for v in distinct}
        if low <= TRUE_VALUES | FALSE_VALUES and len(distinct) <= 2:
            ys.append(np.array([v.lower() in TRUE_VALUES for v in vals], dtype=np.float32))
            names.append(col)
        elif len(distinct) == 2:
            ys.append(np.array([v == distinct[1] for v in vals], dtype=np.float32))
            names.append(f"{col}={distinct[1]}")
        elif len(distinct) > 2:
            for d in distinct:
                ys.append(np.array([v == d for v in vals], dtype=np.float32))
                names.append(f"{col}={d}")
        else:
            raise ValueError(f"label column '{col}' has fewer than two classes ({distinct})")
    return np.stack(ys, axis=1), names, mask



def load_npz(path: str | Path, image_size: int | None = None) -> LabelledSet:
    """MedMNIST layout: {train,val,test}_images uint8 [N,H,W] and _labels [N,1] (class) or [N,K] (multi-label)."""
    from fedrad.common.image_ops import fit_square

    d = np.load(path)
    need = [f"{s}_{k}" for s in ("train", "test") for k in ("images", "labels")]
    missing = [k for k in need if k not in d]
    if missing:
        raise ValueError(f"{path}: not a MedMNIST .npz (missing {missing})")
    parts = [s for s in ("train", "val", "test") if f"{s}_images" in d]
    imgs, labs, split, start = [], [], {}, 0
    for s in parts:
        im = d[f"{s}_images"]
        if im.ndim == 4:  # colour MedMNIST: luminance
            im = im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        im = im.astype(np.float32) / (255.0 if d[f"{s}_images"].dtype == np.uint8 else max(float(im.max()), 1.0))
        if image_size and im.shape[1:] != (image_size, image_size):
            im = np.stack([fit_square(x, image_size) for x in im])
        lab = d[f"{s}_labels"].reshape(len(im), -1)
        imgs.append(im.astype(np.float32))
        labs.append(lab)
        split[s] = np.arange(start, start + len(im))
        start += len(im)
    lab = np.concatenate(labs)
    if lab.shape[1] == 1:
        classes = np.unique(lab[:, 0])
        if len(classes) <= 2:
            y, targets = (lab[:, :1] == classes.max()).astype(np.float32), ["label"]
        else:
            y = np.stack([lab[:, 0] == c for c in classes], axis=1).astype(np.float32)
            targets = [f"label={int(c)}" for c in classes]
    else:
        y, targets = (lab > 0).astype(np.float32), [f"label{k}" for k in range(lab.shape[1])]
    n = len(y)
    return LabelledSet(images=np.concatenate(imgs), y=y, targets=targets, groups=np.arange(n, dtype=np.int64),
                       split=split, source=str(path))


def load_folder(data_dir: str | Path, image_size: int, labels_csv: str | Path | None = None,
                targets: list[str] | None = None, cache_dir: str | Path | None = None,
                progress: bool = False) -> LabelledSet:
    """A DICOM or PNG site folder through `load_site`, with the label columns `targets` (default: the CSV's)."""
    from fedrad.client.site.site_data import HEADER_FIELDS, load_site

    # The reader joins `labels_csv` whatever the folder's layout (fedrad.common.sources.base.Reader.csv_labels).
    site = load_site(data_dir, image_size, cache_dir=cache_dir, progress=progress, labels_csv=labels_csv)
    labels = dict(site.labels)
    if not targets:
        targets = [c for c in labels if c not in HEADER_FIELDS]
        if len(targets) != 1:
            raise ValueError(f"say which label column(s) to predict with --target (have {sorted(labels)})")
    missing = [t for t in targets if t not in labels]
    if missing:
        raise ValueError(f"--target {missing} not among the label columns {sorted(labels)}")
    y, names, mask = binarise({t: labels[t] for t in targets})
    idx = np.flatnonzero(mask)
    if len(idx) < 4:
        raise ValueError(f"{data_dir}: only {len(idx)} labelled images for {targets}")
    images = site.as_float(idx).numpy()[:, 0]
    groups = site.group_ids()[idx]
    return LabelledSet(images=images, y=y[idx], targets=names, groups=groups, source=str(data_dir),
                       extra={"paths": [site.paths[i] for i in idx]})


def load_data(data: str | Path, image_size: int, labels_csv: str | Path | None = None,
              targets: list[str] | None = None) -> LabelledSet:
    path = Path(data)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
        ds = load_npz(path, image_size)
        if targets:
            keep = [i for i, t in enumerate(ds.targets) if t in targets or t.split("=")[0] in targets]
            if not keep:
                raise ValueError(f"--target {targets} not in {ds.targets}")
            ds.y, ds.targets = ds.y[:, keep], [ds.targets[i] for i in keep]
        return ds
    return load_folder(path, image_size, labels_csv, targets)



__all__ = ["FALSE_VALUES", "LabelledSet", "TRUE_VALUES", "binarise", "load_data", "load_folder", "load_npz"]
