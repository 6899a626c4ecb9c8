"""Test ROC-AUC (scikit-learn's) per target, its macro mean, and a patient-level bootstrap confidence interval."""

from __future__ import annotations

import math

import numpy as np

N_BOOTSTRAP = 500


def auc_score(y: np.ndarray, s: np.ndarray) -> float:
    """Binary ROC-AUC (sklearn.metrics.roc_auc_score, ties averaged); nan if only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y) > 0.5
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(s)))


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    vals = [auc_score(y[:, t], p[:, t]) for t in range(y.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def bootstrap_ci(y: np.ndarray, probs: list[np.ndarray], groups: np.ndarray, n_boot: int = N_BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float, float]:
    """(AUC, lo, hi): mean over seeds of macro AUC, and a 95 % percentile CI from resampling test PATIENTS.

    Resampling patients (not images) keeps one patient's correlated images together. The interval is
    widened to contain the point estimate when a tiny test set makes the percentile interval lopsided.
    """
    point = float(np.mean([macro_auc(y, p) for p in probs]))
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[k] for k in pick])
        v = np.mean([macro_auc(y[idx], p[idx]) for p in probs])
        if not math.isnan(v):
            stats.append(v)
    if not stats or math.isnan(point):
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return point, float(min(lo, point)), float(max(hi, point))



__all__ = ["N_BOOTSTRAP", "auc_score", "bootstrap_ci", "macro_auc"]
