"""Choosing a share of patients, never of images: one patient's images always land on the same side.

Used for a held-out test set and for "10 % of the labels" (10 % of the patients). Patients are drawn per
stratum (e.g. positive / negative), so both sides keep each class when the data allows.
"""

from __future__ import annotations

import numpy as np


def split_patients(groups: np.ndarray, fraction: float, seed: int = 0, strata: np.ndarray | None = None,
                   both_sides: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rest): sorted image indices of `fraction` of the patients in each stratum, and the others.

    groups: patient id per image. strata: an integer class per image; a patient's stratum is the highest
    of its images' (1 if any image is positive). Each non-empty stratum gives at least one patient; with
    `both_sides` a stratum of two or more patients also keeps at least one on the rest side, and a
    single-patient stratum stays on the rest side (e.g. a test split that must leave training data).
    Deterministic for a given seed.
    """
    groups = np.asarray(groups)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], not {fraction}")
    uniq, inv = np.unique(groups, return_inverse=True)
    stratum = np.zeros(len(uniq), dtype=np.int64)
    if strata is not None:
        np.maximum.at(stratum, inv, np.asarray(strata).astype(np.int64))
    rng = np.random.default_rng(seed)
    chosen = []
    for s in np.unique(stratum):
        members = uniq[stratum == s].copy()
        rng.shuffle(members)
        n = len(members)
        k = int(round(fraction * n))
        if both_sides:
            k = min(max(k, 1), n - 1) if n >= 2 else 0
        else:
            k = max(k, 1)
        chosen.append(members[:k])
    is_chosen = np.isin(groups, np.concatenate(chosen) if chosen else uniq[:0])
    return np.flatnonzero(is_chosen), np.flatnonzero(~is_chosen)


__all__ = ["split_patients"]
