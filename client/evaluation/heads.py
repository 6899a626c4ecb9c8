"""Backbone features and the heads fitted on them: linear probe (sklearn), MLP head, full fine-tune; DP via opacus.

`mlp` and `full` take `dp=(epsilon, delta)` and train with Opacus DP-SGD calibrated to spend at most that.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

HEAD_LR = 1e-3
BACKBONE_LR_FACTOR = 0.1  # full mode: pretrained features move 10x slower than the new head
DP_MAX_GRAD_NORM = 1.0
# Trained heads get at least this many optimizer steps: "20 epochs" of 47 images is one batch per epoch,
# too few for BatchNorm running statistics (eval mode) or the head to settle.
MIN_STEPS = 40


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



__all__ = ["embed_images", "fit_full", "fit_linear", "fit_mlp"]
