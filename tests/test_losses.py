"""Objectives against explicit formulas on a handful of embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedrad.common.losses import OBJECTIVES, get_objective
from fedrad.common.losses.ntxent import supcon_loss
from fedrad.common.losses.simsiam import simsiam_loss
from torch import nn


def _np_supcon(z1: np.ndarray, z2: np.ndarray, labels: list[int], t: float) -> float:
    """SupCon L_out written as loops straight from Khosla et al. eq. 2."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    lab = list(labels) + list(labels)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        denom = sum(math.exp(z[i] @ z[a] / t) for a in range(n2) if a != i)
        pos = [p for p in range(n2) if p != i and lab[p] == lab[i]]
        total += -sum(math.log(math.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos)
    return total / n2


def _np_ntxent(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """SimCLR NT-Xent: anchor i's only positive is its other view."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denom)
    return total / (2 * n)


@pytest.fixture
def emb() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, generator=g, dtype=torch.float64),
            torch.randn(4, 3, generator=g, dtype=torch.float64))


def test_ntxent_two_pairs_by_hand() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # anchor 0 (=e1): sims to others: view-1 of pair 1 (e2) 0, own positive (e1) 1, view-2 of pair 1 (e2) 0
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert supcon_loss(z1, z2, None, t).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_matches_formula(emb) -> None:
    z1, z2 = emb
    labels = [0, 1, 0, 2]
    got = supcon_loss(z1, z2, torch.tensor(labels), 0.2).item()
    assert got == pytest.approx(_np_supcon(z1.numpy(), z2.numpy(), labels, 0.2), rel=1e-5)


def test_ntxent_matches_formula(emb) -> None:
    z1, z2 = emb
    expected = _np_ntxent(z1.numpy(), z2.numpy(), 0.1)
    assert supcon_loss(z1, z2, None, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_distinct_labels_equals_simclr_exactly(emb) -> None:
    z1, z2 = (z.float() for z in emb)
    model = nn.Identity()
    simclr = get_objective("simclr", temperature=0.3).loss(model, z1, z2, None)
    supcon = get_objective("supcon", temperature=0.3).loss(model, z1, z2, torch.tensor([7, 3, 9, 1]))
    assert torch.equal(simclr, supcon)


def test_micle_patient_positives(emb) -> None:
    z1, z2 = (z.float() for z in emb)
    model = nn.Identity()
    groups = torch.tensor([0, 0, 1, 2])
    micle = get_objective("micle", temperature=0.2)
    assert torch.equal(micle.loss(model, z1, z2, groups), supcon_loss(z1, z2, groups, 0.2))
    assert micle.loss(model, z1, z2, groups).item() == pytest.approx(
        _np_supcon(z1.numpy(), z2.numpy(), [0, 0, 1, 2], 0.2), rel=1e-5)


def test_simsiam_by_hand() -> None:
    p1 = torch.tensor([[1.0, 0.0]])
    p2 = torch.tensor([[0.0, 2.0]])
    z1 = torch.tensor([[1.0, 1.0]])
    z2 = torch.tensor([[3.0, 0.0]])
    expected = -0.5 * (1.0 + 2.0 / (2.0 * math.sqrt(2)))  # cos(p1,z2)=1, cos(p2,z1)=1/sqrt2
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-6)


def test_simsiam_per_sample_decomposable() -> None:
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(4))
    per = simsiam_loss(p1, p2, z1, z2, reduction="none")
    batch = simsiam_loss(p1, p2, z1, z2)
    assert batch.item() == pytest.approx(per.mean().item(), rel=1e-6)
    for i in range(5):
        singles = simsiam_loss(p1[i:i + 1], p2[i:i + 1], z1[i:i + 1], z2[i:i + 1])
        assert singles.item() == pytest.approx(per[i].item(), rel=1e-6)
    # d loss_i / d inputs_j == 0 for j != i; and z gets no gradient (stop-grad)
    grads = torch.autograd.grad(per[2], [p1, p2, z1, z2], allow_unused=True)
    for gp in grads[:2]:
        assert torch.count_nonzero(gp[[0, 1, 3, 4]]) == 0 and torch.count_nonzero(gp[2]) > 0
    assert all(gz is None or torch.count_nonzero(gz) == 0 for gz in grads[2:])


def test_simsiam_model_level_decomposable_in_eval_mode() -> None:
    from fedrad.common.models import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", "simsiam", 32).eval()  # eval: BN uses running stats, no batch coupling
    obj = get_objective("simsiam")
    assert obj.per_sample
    x1 = torch.rand(3, 1, 32, 32, requires_grad=True)
    x2 = torch.rand(3, 1, 32, 32)
    batch = obj.loss(model, x1, x2, None)
    singles = [obj.loss(model, x1[i:i + 1], x2[i:i + 1], None) for i in range(3)]
    assert batch.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-4, abs=1e-6)
    (g,) = torch.autograd.grad(singles[0], [x1])
    assert torch.count_nonzero(g[1:]) == 0 and torch.count_nonzero(g[0]) > 0


def test_get_objective_flags() -> None:
    flags = {n: (get_objective(n).needs_labels, get_objective(n).per_sample) for n in OBJECTIVES}
    assert flags == {"simclr": (False, False), "supcon": (True, False), "micle": (False, False),
                     "simsiam": (False, True)}
    assert get_objective("micle").pairing == "patient"
    assert get_objective("SimCLR").name == "simclr"
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("moco")
    with pytest.raises(ValueError):
        get_objective("supcon").loss(nn.Identity(), torch.ones(2, 2), torch.ones(2, 2), None)


def test_supcon_bf16_inputs_computed_in_fp32(emb) -> None:
    z1, z2 = emb
    ref = supcon_loss(z1.float(), z2.float(), None, 0.1)
    got = supcon_loss(z1.bfloat16(), z2.bfloat16(), None, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
