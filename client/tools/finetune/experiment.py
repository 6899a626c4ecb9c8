"""The label-efficiency experiment: every backbone x label fraction (x seed), scored on one test set."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrad.client.evaluation.data import LabelledSet
from fedrad.client.evaluation.heads import embed_images, fit_full, fit_linear, fit_mlp
from fedrad.client.evaluation.metrics import auc_score, bootstrap_ci, macro_auc
from fedrad.client.evaluation.splits import subsample_patients

if TYPE_CHECKING:
    from torch import nn


@dataclass
class Arm:
    """One backbone under test: a name, the module, and the input size it was trained at."""

    name: str
    backbone: nn.Module
    size: int | None


def run_experiment(arms: list[Arm], data: LabelledSet, train_idx: np.ndarray, test_idx: np.ndarray,
                   fractions: list[float], mode: str = "linear", seeds: int = 1, epochs: int = 20,
                   dp: tuple[float, float] | None = None, device: str = "cpu",
                   log=None) -> list[dict[str, Any]]:
    """Every arm x fraction: fit on the fraction's training patients (per seed), AUC + CI on the test set."""
    if mode not in ("linear", "mlp", "full"):
        raise ValueError(f"mode must be linear, mlp or full, not {mode!r}")
    if dp is not None and mode == "linear":
        raise ValueError("--dp-epsilon needs --mode mlp or full (the sklearn probe has no DP training)")
    yte, gte = data.y[test_idx], data.groups[test_idx]
    rows = []
    for arm in arms:
        feats = None
        if mode != "full":
            feats = embed_images(arm.backbone, data.images, arm.size, device)
        for frac in fractions:
            probs, eps_spent, n_img, n_pat = [], [], [], []
            t0 = time.perf_counter()
            for s in range(seeds):
                tr = subsample_patients(train_idx, data.groups, data.y, frac, seed=1000 * s + 7)
                n_img.append(len(tr))
                n_pat.append(len(np.unique(data.groups[tr])))
                if mode == "linear":
                    p, e = fit_linear(feats[tr], data.y[tr], feats[test_idx], seed=s), None
                elif mode == "mlp":
                    p, e = fit_mlp(feats[tr], data.y[tr], feats[test_idx], epochs, s, dp, device)
                else:
                    p, e = fit_full(arm.backbone, data.images[tr], data.y[tr], data.images[test_idx], arm.size,
                                    epochs, s, dp, device)
                probs.append(p)
                if e is not None:
                    eps_spent.append(e)
            auc, lo, hi = bootstrap_ci(yte, probs, gte)
            per_seed = [macro_auc(yte, p) for p in probs]
            row = {"backbone": arm.name, "mode": mode, "fraction": frac, "train_images": int(np.mean(n_img)),
                   "train_patients": int(np.mean(n_pat)), "test_images": int(len(test_idx)),
                   "auc": auc, "ci_low": lo, "ci_high": hi,
                   "auc_seed_std": float(np.std(per_seed)) if seeds > 1 else 0.0, "seeds": seeds,
                   "epsilon": max(eps_spent) if eps_spent else None,
                   "delta": dp[1] if dp else None, "seconds": round(time.perf_counter() - t0, 2),
                   "per_target": {t: float(np.mean([auc_score(yte[:, k], p[:, k]) for p in probs]))
                                  for k, t in enumerate(data.targets)}}
            rows.append(row)
            if log:
                log(f"  {arm.name:<14} {mode:<6} {frac:>6.0%}: AUC {auc:.3f} [{lo:.3f}, {hi:.3f}] "
                    f"({row['train_patients']} patients, {row['seconds']:.1f}s)")
    return rows


def random_arm(model: str, size: int | None, seed: int = 20240101, norm: str = "batch") -> Arm:
    """Same architecture, random init: the baseline every pretrained number is compared against."""
    import torch

    from fedrad.common.models import create_backbone

    torch.manual_seed(seed)
    return Arm("random-init", create_backbone(model, in_chans=1, image_size=size, norm=norm).eval(), size)


__all__ = ["Arm", "random_arm", "run_experiment"]
