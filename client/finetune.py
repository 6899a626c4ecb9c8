"""`fedrad finetune`: how much do the foundation weights save a site in labels?

A site verifies the bundle, then fits a classifier on 1-100 % of its labelled patients and reports test
ROC-AUC with a patient-level bootstrap 95 % CI, next to a randomly initialised backbone of the same
architecture (and optionally a second bundle). Splits and label subsampling are always by patient, so no
patient's images are on both sides and "10 % of labels" means 10 % of patients.

Modes: `linear` (logistic regression on frozen embeddings, the standard probe), `mlp` (small torch head on
frozen embeddings; the mode that supports sample-level DP cheaply), `full` (end to end, backbone lr 10x lower
than the head's). `--dp-epsilon` trains the mlp head or the whole network with Opacus DP-SGD.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

TEST_FRACTION = 0.3
N_BOOTSTRAP = 500
HEAD_LR = 1e-3
BACKBONE_LR_FACTOR = 0.1  # full mode: pretrained features move 10x slower than the new head
DP_MAX_GRAD_NORM = 1.0
# Trained heads get at least this many optimizer steps: "20 epochs" of 47 images is one batch per epoch,
# too few for BatchNorm running statistics (eval mode) or the head to settle.
MIN_STEPS = 40
TRUE_VALUES = {"1", "true", "yes", "y", "positive", "pos", "t"}
FALSE_VALUES = {"0", "false", "no", "n", "negative", "neg", "f"}


# -- data -----------------------------------------------------------------------------------------
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


def _binarise(columns: dict[str, list[str]]) -> tuple[np.ndarray, list[str], np.ndarray]:
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


def _csv_labels_for_images(site, root: Path, labels_csv: Path) -> dict[str, list[str]]:
    """A labels CSV joined onto a PNG/JPEG site by its `image` or `file` column (relative to the folder)."""
    from fedrad.client.site_data import read_csv

    rows = read_csv(labels_csv)
    key = "image" if rows and "image" in rows[0] else "file"
    if not rows or key not in rows[0]:
        raise ValueError(f"{labels_csv}: needs an 'image' or 'file' column for a PNG/JPEG folder")
    by_path = {str((root / r[key]).resolve()): r for r in rows}
    cols = [c for c in rows[0] if c not in (key, "patient_id", "")]
    return {c: [by_path.get(str(Path(p).resolve()), {}).get(c, "") for p in site.paths] for c in cols}


def load_folder(data_dir: str | Path, image_size: int, labels_csv: str | Path | None = None,
                targets: list[str] | None = None, cache_dir: str | Path | None = None,
                progress: bool = False) -> LabelledSet:
    """A DICOM or PNG site folder through `load_site`, with the label columns `targets` (default: the CSV's)."""
    from fedrad.client.site_data import HEADER_FIELDS, detect_layout, load_site

    layout, _ = detect_layout(data_dir)
    site = load_site(data_dir, image_size, cache_dir=cache_dir, progress=progress,
                     labels_csv=labels_csv if layout == "dicom" else None)
    labels = dict(site.labels)
    if labels_csv and layout == "images":
        labels.update(_csv_labels_for_images(site, Path(data_dir).resolve(), Path(labels_csv)))
    if not targets:
        targets = [c for c in labels if c not in HEADER_FIELDS]
        if len(targets) != 1:
            raise ValueError(f"say which label column(s) to predict with --target (have {sorted(labels)})")
    missing = [t for t in targets if t not in labels]
    if missing:
        raise ValueError(f"--target {missing} not among the label columns {sorted(labels)}")
    y, names, mask = _binarise({t: labels[t] for t in targets})
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


# -- splits ---------------------------------------------------------------------------------------
def _patient_labels(groups: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique patients, their stratum: 1 if any image is positive for the first target)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    pos = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(pos, inv, (y[:, 0] > 0.5).astype(np.int64))
    return uniq, pos


def patient_split(groups: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices with no patient on both sides, stratified by patient label."""
    uniq, stratum = _patient_labels(groups, y)
    rng = np.random.default_rng(seed)
    test_p = []
    for s in (0, 1):
        members = uniq[stratum == s]
        rng.shuffle(members)
        k = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        test_p.append(members[:k])
    is_test = np.isin(groups, np.concatenate(test_p))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def subsample_patients(idx: np.ndarray, groups: np.ndarray, y: np.ndarray, fraction: float,
                       seed: int) -> np.ndarray:
    """A `fraction` of the patients in `idx` (all their images), at least one of each class if possible."""
    if fraction >= 1.0:
        return np.asarray(idx)
    uniq, stratum = _patient_labels(groups[idx], y[idx])
    rng = np.random.default_rng(seed)
    keep = []
    for s in (0, 1):
        members = uniq[stratum == s].copy()
        if not len(members):
            continue
        rng.shuffle(members)
        keep.append(members[: max(1, int(round(fraction * len(members))))])
    return idx[np.isin(groups[idx], np.concatenate(keep))]


# -- metrics --------------------------------------------------------------------------------------
def auc_score(y: np.ndarray, s: np.ndarray) -> float:
    """Binary ROC-AUC via the rank-sum (ties averaged); nan if only one class is present."""
    from scipy.stats import rankdata

    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


# -- features and heads ---------------------------------------------------------------------------
def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    import torch.nn.functional as F

    if size and x.shape[-1] != size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def embed_images(backbone: nn.Module, images: np.ndarray, size: int | None = None, device: str = "cpu",
                 batch_size: int = 256) -> np.ndarray:
    """Backbone features of float [N, S, S] images in eval mode (BN running stats), float32 [N, D]."""
    import torch

    backbone.eval().to(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).unsqueeze(1).to(device)
            out.append(backbone(_resize(x, size)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(backbone.num_features)), np.float32)


def fit_linear(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, seed: int = 0) -> np.ndarray:
    """Standardised logistic regression per target (the usual linear probe); probabilities [Nte, T]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    a, b = scaler.transform(xtr), scaler.transform(xte)
    out = np.zeros((len(xte), ytr.shape[1]), np.float32)
    for t in range(ytr.shape[1]):
        if len(np.unique(ytr[:, t])) < 2:
            out[:, t] = float(ytr[:, t].mean())
            continue
        clf = LogisticRegression(C=0.5, max_iter=3000, random_state=seed)
        out[:, t] = clf.fit(a, ytr[:, t]).predict_proba(b)[:, 1]
    return out


def _loader(tensors: tuple, batch_size: int, seed: int, drop_last: bool):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=g,
                      drop_last=drop_last)


def _train_loop(model: nn.Module, opt, loader, epochs: int, device: str, size: int | None,
                images: bool) -> None:
    import warnings

    import torch

    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    # Opacus' hooks on a frozen-input head trip a harmless torch warning on every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling (DP) may draw an empty batch
                continue
            xb, yb = xb.to(device), yb.to(device)
            if images:
                xb = _resize(xb.unsqueeze(1), size)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()


def _make_private(model: nn.Module, opt, loader, epochs: int, dp: tuple[float, float]):
    """Opacus DP-SGD calibrated so that `epochs` passes spend at most `dp` = (epsilon, delta) (RDP account)."""
    import warnings

    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=dp[0], target_delta=dp[1],
            epochs=epochs, max_grad_norm=DP_MAX_GRAD_NORM)
    return engine, model, opt, loader


def fit_mlp(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, epochs: int = 20, seed: int = 0,
            dp: tuple[float, float] | None = None, device: str = "cpu",
            hidden: int = 128) -> tuple[np.ndarray, float | None]:
    """A two-layer head on standardised frozen features; with `dp=(eps, delta)` trained by DP-SGD.

    Returns (probabilities [Nte, T], spent epsilon or None).
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mu, sd = xtr.mean(0, keepdims=True), xtr.std(0, keepdims=True) + 1e-6
    a = torch.from_numpy(((xtr - mu) / sd).astype(np.float32))
    b = torch.from_numpy(((xte - mu) / sd).astype(np.float32))
    head = nn.Sequential(nn.Linear(a.shape[1], hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, ytr.shape[1])).to(device)
    loader = _loader((a, torch.from_numpy(ytr.astype(np.float32))), min(64, len(a)), seed, drop_last=False)
    epochs = max(epochs, math.ceil(MIN_STEPS / max(1, len(loader))))
    opt = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=1e-4)
    eps = None
    engine = None
    if dp is not None:
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        engine, head, opt, loader = _make_private(head, opt, loader, epochs, dp)
    _train_loop(head, opt, loader, epochs, device, None, images=False)
    if engine is not None:
        eps = float(engine.get_epsilon(dp[1]))
    head.eval()
    with torch.no_grad():
        p = torch.sigmoid(head(b.to(device))).cpu().numpy()
    return p, eps


def fit_full(backbone: nn.Module, img_tr: np.ndarray, ytr: np.ndarray, img_te: np.ndarray, size: int | None,
             epochs: int = 20, seed: int = 0, dp: tuple[float, float] | None = None,
             device: str = "cpu", batch_size: int = 64) -> tuple[np.ndarray, float | None]:
    """End-to-end fine-tune of a copy of `backbone` + linear head (backbone lr 10x lower).

    With DP: BatchNorm -> GroupNorm (BN mixes samples, so per-sample gradients would not exist), the
    opacus-safe structure of `fedrad.common.norms`, DP-SGD to the target epsilon.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = copy.deepcopy(backbone)
    model = nn.Sequential(net, nn.Linear(int(net.num_features), ytr.shape[1]))
    if dp is not None:
        from fedrad.common.norms import to_group_norm

        to_group_norm(model)  # no-op for a backbone already trained with dp=sample
    model.to(device)
    bs = min(batch_size, len(img_tr))
    loader = _loader((torch.from_numpy(img_tr.astype(np.float32)), torch.from_numpy(ytr.astype(np.float32))),
                     bs, seed, drop_last=len(img_tr) > bs)
    epochs = max(epochs, math.ceil(MIN_STEPS / max(1, len(loader))))
    groups = [{"params": model[0].parameters(), "lr": HEAD_LR * BACKBONE_LR_FACTOR},
              {"params": model[1].parameters(), "lr": HEAD_LR}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    eps = None
    if dp is not None:
        from fedrad.common.norms import opacus_safe

        with opacus_safe(model):
            engine, model, opt, loader = _make_private(model, opt, loader, epochs, dp)
            _train_loop(model, opt, loader, epochs, device, size, images=True)
        eps = float(engine.get_epsilon(dp[1]))
    else:
        _train_loop(model, opt, loader, epochs, device, size, images=True)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(img_te), 256):
            x = torch.from_numpy(np.ascontiguousarray(img_te[i:i + 256])).unsqueeze(1).to(device)
            out.append(torch.sigmoid(model(_resize(x, size))).cpu().numpy())
    return np.concatenate(out), eps


# -- experiment -----------------------------------------------------------------------------------
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    dp = any(r.get("epsilon") is not None for r in rows)
    head = "| backbone | mode | labels | train patients | test ROC-AUC | 95% CI |" + (" ε spent |" if dp else "")
    sep = "|---|---|---|---|---|---|" + ("---|" if dp else "")
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['backbone']} | {r['mode']} | {r['fraction']:.0%} | {r['train_patients']} | "
                f"{r['auc']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
        if dp:
            line += f" {r['epsilon']:.2f} |" if r.get("epsilon") is not None else " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_auc(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """AUC vs label fraction (log x), one line per backbone and mode, 95 % CI as error bars; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fedrad.common.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(dict.fromkeys((r["backbone"], r["mode"]) for r in rows))
    for name, mode in keys:
        sel = sorted((r for r in rows if r["backbone"] == name and r["mode"] == mode), key=lambda r: r["fraction"])
        x = [r["fraction"] * 100 for r in sel]
        y = [r["auc"] for r in sel]
        err = [[max(0.0, r["auc"] - r["ci_low"]) for r in sel], [max(0.0, r["ci_high"] - r["auc"]) for r in sel]]
        label = name if len({m for _, m in keys}) == 1 else f"{name} ({mode})"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training patients (%)")
    ax.set_ylabel("test ROC-AUC")
    ax.set_title(title or "label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any], title: str = "") -> str:
    """results.json, results.md and auc_vs_fraction.png in `out_dir`, each written atomically."""
    from fedrad.common.atomic import atomic_write_bytes, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    atomic_write_json(out_dir / "results.json", {"meta": meta, "rows": rows})
    md = f"# {title or 'fedrad fine-tuning'}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + table
    atomic_write_bytes(out_dir / "results.md", md.encode("utf-8"))
    plot_auc(rows, out_dir / "auc_vs_fraction.png", title)
    return table


def random_arm(model: str, size: int | None, seed: int = 20240101, norm: str = "batch") -> Arm:
    """Same architecture, random init: the baseline every pretrained number is compared against."""
    import torch
    from fedrad.common.models import create_backbone

    torch.manual_seed(seed)
    return Arm("random-init", create_backbone(model, in_chans=1, image_size=size, norm=norm).eval(), size)


def _parse_fractions(text: str) -> list[float]:
    fr = sorted({float(x) for x in text.split(",") if x.strip()})
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise ValueError(f"--fractions must be numbers in (0, 1], got {text!r}")
    return fr


def cmd_finetune(args: argparse.Namespace) -> int:
    """Verify, load data, split by patient, fit per fraction and seed, write the tables and the plot."""
    from fedrad.client.trainer import resolve_device
    from fedrad.server.release import BundleVerificationError, load_verified_backbone

    fractions = _parse_fractions(args.fractions)
    if args.seeds < 1 or args.epochs < 1:
        raise ValueError("--seeds and --epochs must be >= 1")
    dp = (float(args.dp_epsilon), float(args.dp_delta)) if args.dp_epsilon is not None else None
    if dp is not None and (dp[0] <= 0 or not 0 < dp[1] < 1):
        raise ValueError("--dp-epsilon must be > 0 and --dp-delta in (0, 1)")
    if not args.insecure and not args.pubkey:
        print("fedrad finetune: error: pass --pubkey to verify the bundle (or --insecure to skip)", file=sys.stderr)
        return 2
    try:
        backbone, manifest = load_verified_backbone(args.bundle, args.pubkey, args.insecure)
        arms = [Arm("pretrained", backbone, manifest.get("input_size"))]
        if args.compare:
            other, m2 = load_verified_backbone(args.compare, args.pubkey, args.insecure)
            arms.append(Arm(f"compare:{Path(args.compare).name}", other, m2.get("input_size")))
    except BundleVerificationError as exc:
        print(f"fedrad finetune: bundle verification FAILED: {exc}", file=sys.stderr)
        return 1
    if not args.insecure:
        print(f"fedrad finetune: bundle {args.bundle} verified", file=sys.stderr)
    size = int(manifest.get("input_size") or 64)
    arms.insert(1, random_arm(manifest["model"], manifest.get("input_size"),
                                norm=manifest.get("norm", "batch")))
    targets = [t.strip() for t in args.target.split(",")] if args.target else None
    data = load_data(args.data, size, args.labels, targets)
    if data.split and "test" in data.split:
        train_idx, test_idx, split_kind = data.split["train"], data.split["test"], "official train/test"
    else:
        train_idx, test_idx = patient_split(data.groups, data.y)
        split_kind = f"patient-level {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}"
    device = str(resolve_device(args.device))
    print(f"fedrad finetune: {len(data)} images, targets {data.targets}, split {split_kind} "
          f"({len(train_idx)} train / {len(test_idx)} test), mode {args.mode} on {device}", file=sys.stderr)
    rows = run_experiment(arms, data, train_idx, test_idx, fractions, args.mode, args.seeds, args.epochs, dp,
                          device, log=lambda m: print(m, file=sys.stderr))
    meta = {"bundle": str(args.bundle), "verified": not args.insecure, "model": manifest.get("model"),
            "input_size": size, "data": str(args.data), "targets": data.targets, "split": split_kind,
            "mode": args.mode, "seeds": args.seeds, "epochs": args.epochs,
            "dp": f"epsilon={dp[0]}, delta={dp[1]}" if dp else "none",
            "ci": f"95% percentile bootstrap over test patients ({N_BOOTSTRAP} resamples)"}
    table = write_outputs(Path(args.out), rows, meta, f"fine-tuning {manifest.get('model')} ({args.mode})")
    print(table)
    print(f"fedrad finetune: results in {Path(args.out) / 'results.md'}, plot {Path(args.out) / 'auc_vs_fraction.png'}")
    return 0


def demo_finetune(bundle: str | Path, pubkey: str | Path, sites: list[Path], out_dir: str | Path) -> str:
    """End of `fedrad demo`: pooled sites' `finding` labels, patient split, linear probe at 25 % / 100 %.

    Patients are namespaced by site (keys are salted per site). Returns the printed table.
    """
    import torch
    from fedrad.server.release import load_verified_backbone

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    backbone, manifest = load_verified_backbone(bundle, pubkey)
    size = int(manifest.get("input_size") or 64)
    out = Path(out_dir)
    parts = []
    for i, site in enumerate(sites):
        ds = load_folder(site, size, targets=["finding"], cache_dir=out / ".cache" / Path(site).name)
        ds.groups = ds.groups + i * 1_000_000
        parts.append(ds)
    data = LabelledSet(images=np.concatenate([p.images for p in parts]), y=np.concatenate([p.y for p in parts]),
                       targets=parts[0].targets, groups=np.concatenate([p.groups for p in parts]),
                       source=", ".join(str(s) for s in sites))
    train_idx, test_idx = patient_split(data.groups, data.y, seed=0)
    arms = [Arm("pretrained", backbone, size), random_arm(manifest["model"], size, norm=manifest.get("norm", "batch"))]
    rows = run_experiment(arms, data, train_idx, test_idx, [0.25, 1.0], "linear", seeds=3)
    meta = {"bundle": str(bundle), "sites": len(sites), "images": len(data), "test_images": len(test_idx),
            "split": "patient-level, pooled sites", "mode": "linear", "seeds": 3}
    table = write_outputs(out, rows, meta, "demo fine-tuning (synthetic 'finding')")
    return (f"{len(data)} labelled images from {len(sites)} sites; {len(test_idx)} test images "
            f"({len(np.unique(data.groups[test_idx]))} held-out patients)\n" + table)


__all__ = ["Arm", "LabelledSet", "bootstrap_ci", "cmd_finetune", "demo_finetune", "embed_images", "fit_full",
           "fit_linear", "fit_mlp", "load_data", "load_folder", "load_npz", "patient_split", "run_experiment",
           "subsample_patients", "write_outputs"]
