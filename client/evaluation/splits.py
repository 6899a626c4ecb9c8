"""Fine-tuning's splits: the data's official train/test split if it has one, else 70/30 by patient, and
label fractions as fractions of the training patients (both through `fedrad.common.splits`)."""

from __future__ import annotations

import numpy as np

from fedrad.client.evaluation.data import LabelledSet
from fedrad.common.splits import split_patients

TEST_FRACTION = 0.3


def _positive(y: np.ndarray) -> np.ndarray:
    """The stratum of an image: positive for the first target."""
    return (np.asarray(y)[:, 0] > 0.5).astype(np.int64)


def patient_split(groups: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices with no patient on both sides, stratified by patient label."""
    test, train = split_patients(groups, test_fraction, seed, strata=_positive(y), both_sides=True)
    return train, test


def subsample_patients(idx: np.ndarray, groups: np.ndarray, y: np.ndarray, fraction: float,
                       seed: int) -> np.ndarray:
    """A `fraction` of the patients in `idx` (all their images), at least one of each class if possible."""
    idx = np.asarray(idx)
    if fraction >= 1.0:
        return idx
    chosen, _ = split_patients(groups[idx], fraction, seed, strata=_positive(y[idx]))
    return idx[chosen]


def holdout_split(data: LabelledSet, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test, description): the official split when the data has one, else by patient."""
    if data.split and "test" in data.split:
        return data.split["train"], data.split["test"], "official train/test"
    train, test = patient_split(data.groups, data.y, seed=seed)
    return train, test, f"patient-level {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}"


__all__ = ["TEST_FRACTION", "holdout_split", "patient_split", "subsample_patients"]
