"""A SiteData-shaped object from synthetic structured images, for tests that must not depend on DICOM I/O.

Each "patient" has a few images of one of several shape classes (disc, bar, ring, cross) at jittered
positions over a smooth background, so contrastive objectives have real structure to learn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FakeSiteData:
    images: np.ndarray  # uint16 [N,S,S]
    paths: list[str]
    patient_keys: list[str]
    labels: dict[str, list[str]]
    skipped: Counter = field(default_factory=Counter)
    image_size: int = 32

    def __len__(self) -> int:
        return len(self.images)

    def label_ids(self, fields: list[str]) -> np.ndarray:
        combined = ["|".join(self.labels[f][i] for f in fields) for i in range(len(self))]
        table: dict[str, int] = {}
        return np.array([table.setdefault(c, len(table)) for c in combined], dtype=np.int64)

    def group_ids(self) -> np.ndarray:
        table: dict[str, int] = {}
        return np.array([table.setdefault(k, len(table)) for k in self.patient_keys], dtype=np.int64)

    def as_float(self, idx) -> torch.Tensor:
        arr = self.images[np.asarray(idx)].astype(np.float32) / 65535.0
        return torch.from_numpy(arr).unsqueeze(1)


def make_fake_site(n: int = 96, size: int = 32, seed: int = 0, per_patient: int = 3) -> FakeSiteData:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs, keys, view, sex, age, body = [], [], [], [], [], []
    for i in range(n):
        pid = i // per_patient
        cls = pid % 4
        cx, cy = 0.5 + rng.uniform(-0.15, 0.15, 2)
        r = np.hypot(xx - cx, yy - cy)
        bg = 0.2 + 0.2 * yy + rng.uniform(-0.05, 0.05)
        if cls == 0:
            shape = (r < 0.22).astype(np.float32)
        elif cls == 1:
            shape = (np.abs(xx - cx) < 0.08).astype(np.float32)
        elif cls == 2:
            shape = ((r > 0.15) & (r < 0.27)).astype(np.float32)
        else:
            shape = ((np.abs(xx - cx) < 0.06) | (np.abs(yy - cy) < 0.06)).astype(np.float32)
        img = np.clip(bg + 0.6 * shape + rng.normal(0, 0.02, (size, size)), 0, 1)
        imgs.append((img * 65535).astype(np.uint16))
        keys.append(f"p{pid:04d}")
        view.append(["PA", "AP", "LAT", "PA"][cls])
        body.append("CHEST")
        sex.append("F" if pid % 2 else "M")
        age.append("40-60")
    labels = {"view": view, "body_part": body, "sex": sex, "age": age, "modality": ["CR"] * n}
    return FakeSiteData(np.stack(imgs), [f"img{i}.dcm" for i in range(n)], keys, labels, Counter(), size)
