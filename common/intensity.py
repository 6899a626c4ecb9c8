"""Intensity per modality: CT in Hounsfield units with window presets, MR normalised per series.

Why (measured by benchmarks/bench_xsec_intensity.py, numbers in benchmarks/RESULTS.md): a header window or a
per-image min-max puts water, fat and bone at a different grey level in every CT file (each scanner, each
field of view), while HU are the same physical scale everywhere; and MR intensities have no unit, so each
slice scaled alone makes a dark end slice as bright as the middle of the volume. Hence:
- CT is stored in the cache as HU mapped linearly from [-1024, 3071] onto [0, 1] (1/16 HU per uint16 step)
  and a window preset (lung, mediastinum, bone, brain, soft tissue) is applied when a batch is drawn,
  sampled per image among the presets its body part calls for (all five when the body part is unknown).
- MR is stored per image between its own 0.5 / 99.5 percentiles, with those values kept in the metadata;
  the site loader turns them into one affine per image that maps every slice of a series onto the series'
  (median) percentile range: per-series normalisation without decoding twice.
- Radiographs, US, NM and PET keep their display mapping (VOI LUT / window, else robust min-max).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CT_HU_RANGE = (-1024.0, 3071.0)  # stored linearly on [0, 1]
MR_PERCENTILES = (0.5, 99.5)
# (center, width) in HU
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
}
PRESET_NAMES = tuple(PRESETS)
_BODY_PARTS: dict[str, tuple[str, ...]] = {
    "HEAD": ("brain", "bone", "soft_tissue"), "BRAIN": ("brain", "bone", "soft_tissue"),
    "SKULL": ("brain", "bone", "soft_tissue"), "NECK": ("soft_tissue", "bone", "mediastinum"),
    "CHEST": ("lung", "mediastinum", "bone"), "THORAX": ("lung", "mediastinum", "bone"),
    "LUNG": ("lung", "mediastinum", "bone"), "ABDOMEN": ("soft_tissue", "bone"),
    "PELVIS": ("soft_tissue", "bone"), "SPINE": ("bone", "soft_tissue"),
}


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU -> the cache's linear [0, 1] CT scale."""
    lo, hi = CT_HU_RANGE
    return np.clip((np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def preset_mask(body_part: str) -> int:
    """Bit mask of the presets a CT image of `body_part` may be shown with (bit i = PRESET_NAMES[i])."""
    names = _BODY_PARTS.get((body_part or "").strip().upper(), PRESET_NAMES)
    return sum(1 << PRESET_NAMES.index(n) for n in names)


def series_affines(lo: np.ndarray, hi: np.ndarray, series_ids: np.ndarray) -> np.ndarray:
    """float32 [N, 2] (scale, offset) mapping each image's own [lo, hi] scale onto its series' median range."""
    out = np.tile(np.array([1.0, 0.0], dtype=np.float32), (len(lo), 1))
    ok = np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
    for s in np.unique(series_ids[ok]):
        at = np.flatnonzero(ok & (series_ids == s))
        slo, shi = float(np.median(lo[at])), float(np.median(hi[at]))
        if shi <= slo:
            continue
        out[at, 0] = (hi[at] - lo[at]) / (shi - slo)
        out[at, 1] = (lo[at] - slo) / (shi - slo)
    return out


def apply_intensity(x: torch.Tensor, affine: np.ndarray | None, ct_mask: np.ndarray | None,
                    g: torch.Generator | None) -> torch.Tensor:
    """Per image of a batch x [B, 1, H, W]: the series affine (MR), then for CT a window preset sampled among
    those its mask allows. Other images pass through unchanged."""
    import torch

    if affine is not None and (affine[:, 0] != 1).any() | (affine[:, 1] != 0).any():
        a = torch.as_tensor(affine, dtype=x.dtype, device=x.device)
        x = (x * a[:, 0, None, None, None] + a[:, 1, None, None, None]).clamp_(0.0, 1.0)
    if ct_mask is None or not (ct_mask > 0).any():
        return x
    rows = np.flatnonzero(ct_mask > 0)
    u = torch.rand(len(rows), generator=g, device=g.device if g is not None else "cpu").cpu().numpy()
    centers = np.zeros(len(rows), dtype=np.float32)
    widths = np.ones(len(rows), dtype=np.float32)
    for j, r in enumerate(rows):
        allowed = [PRESETS[n] for i, n in enumerate(PRESET_NAMES) if ct_mask[r] >> i & 1]
        centers[j], widths[j] = allowed[min(len(allowed) - 1, int(u[j] * len(allowed)))]
    lo, hi = CT_HU_RANGE
    idx = torch.as_tensor(rows, device=x.device)
    hu = x[idx] * (hi - lo) + lo
    c = torch.as_tensor(centers, device=x.device, dtype=x.dtype)[:, None, None, None]
    w = torch.as_tensor(widths, device=x.device, dtype=x.dtype)[:, None, None, None]
    x = x.clone()
    x[idx] = ((hu - (c - w / 2)) / w).clamp_(0.0, 1.0)
    return x
