"""Small image helpers shared by the DICOM and PNG paths.

Kept free of torch so decode worker processes start fast (PIL's resize is antialiased when shrinking).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize `img` (float32 HxW) so its longer side is `size`, keep the aspect ratio, zero-pad to square.

    Padding is 0 (black) and centred, so a portrait film stays a portrait film inside the square and the
    model never sees stretched anatomy. Downscaling uses PIL's antialiased bilinear filter on a float image.
    """
    if img.ndim != 2:
        raise ValueError(f"fit_square expects a 2-D image, got shape {img.shape}")
    if size < 1:
        raise ValueError("size must be >= 1")
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    src = np.ascontiguousarray(img, dtype=np.float32)
    if (nh, nw) != (h, w):
        pil = Image.fromarray(src, mode="F")
        # reducing_gap: a fast integer box-reduce first, then an exact antialiased bilinear resize.
        src = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = src
    return out


def to_uint16(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 (x65535): the cache's storage format, 16 bits so 12-16 bit films keep detail."""
    return np.round(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)


def robust_minmax(img: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale to [0, 1] between the `low` and `high` percentiles (on a subsample: fast on 4k x 3k films)."""
    step = max(1, int(np.sqrt(img.size / 250_000)))
    sample = img[::step, ::step]
    lo, hi = np.percentile(sample, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.float32)
    return np.clip((img.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
