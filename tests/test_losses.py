"""Objectives against explicit formulas on a handful of embeddings."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedrad.common.losses import OBJECTIVES, REGISTRY, get_objective, per_sample_objectives
from fedrad.common.losses.base import POSITIVES
from fedrad.common.losses.byol import byol_loss
from fedrad.common.losses.ntxent import supcon_loss
from fedrad.common.losses.simsiam import simsiam_loss


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
                     "micle+supcon": (True, False), "simsiam": (False, True), "byol": (False, True),
                     "slices": (False, False)}
    assert {n: REGISTRY[n].positives for n in OBJECTIVES} == {
        "simclr": "augment", "supcon": "labels", "micle": "patient", "micle+supcon": "patient+labels",
        "simsiam": "augment", "byol": "augment", "slices": "slices"}
    assert per_sample_objectives() == ("simsiam", "byol")
    assert get_objective("micle").pairing == "patient"
    assert get_objective("SimCLR").name == "simclr"
    with pytest.raises(ValueError, match="unknown objective 'moco'.*byol"):
        get_objective("moco")
    with pytest.raises(ValueError):
        get_objective("supcon").loss(nn.Identity(), torch.ones(2, 2), torch.ones(2, 2), None)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_registry_entries_are_complete(name: str) -> None:
    """Each registered objective names itself, declares known positives, and its heads are the model's."""
    from fedrad.common.models import build_model

    cls = REGISTRY[name]
    assert cls.name == name and cls.positives in POSITIVES and cls.n_views in (1, 2)
    heads = get_objective(name).heads(64, 16)
    assert "projector" in heads and "backbone" not in heads
    model = build_model("test_resnet", name, 32, proj_dim=16)
    assert model.head_names == tuple(heads)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"backbone", *heads}
    assert get_objective(name) is not get_objective(name)  # one fresh instance per training call


def test_registry_import_does_not_import_torch() -> None:
    code = ("import sys, fedrad.common.losses as m; "
            "print(len(m.OBJECTIVES), m.per_sample_objectives(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(maxsplit=1)[1].strip().endswith("False")


def test_byol_loss_by_hand() -> None:
    p1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    p2 = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    t1 = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    t2 = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    # sample 0: cos(p1,t2) = 1, cos(p2,t1) = 1/sqrt2; sample 1: cos(p1,t2) = -1, cos(p2,t1) = -1/sqrt2
    per = [2.0 - (1.0 + 1 / math.sqrt(2)), 2.0 - (-1.0 - 1 / math.sqrt(2))]
    got = byol_loss(p1, p2, t1, t2, reduction="none")
    assert got.tolist() == pytest.approx(per, rel=1e-6)
    assert byol_loss(p1, p2, t1, t2).item() == pytest.approx(sum(per) / 2, rel=1e-6)
    # the same value as mean ||p/|p| - t/|t|||^2 over both directions (2 - 2cos, averaged)
    def sq(a, b):
        return (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1)
    assert got.tolist() == pytest.approx(((sq(p1, t2) + sq(p2, t1)) / 2).tolist(), rel=1e-6)


def test_byol_objective_matches_hand_computation_on_a_model() -> None:
    """The objective's loss is byol_loss of the online predictions against the target's projections, and
    only the online network gets gradients."""
    from fedrad.common.models import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", "byol", 32, proj_dim=16).eval()
    obj = get_objective("byol")
    obj.start(model)
    with torch.no_grad():  # make the target differ from the online network
        for p in obj.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x1, x2 = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    loss = obj.loss(model, x1, x2)
    with torch.no_grad():
        p1, p2 = model.predictor(model(x1)), model.predictor(model(x2))
        t1, t2 = obj.target(x1), obj.target(x2)
        cos = F.cosine_similarity
        expected = (2.0 - (cos(p1, t2, dim=1) + cos(p2, t1, dim=1))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in obj.target.parameters())


def test_byol_per_sample_decomposable() -> None:
    g = torch.Generator().manual_seed(1)
    p1, p2, t1, t2 = (torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(4))
    per = byol_loss(p1, p2, t1, t2, reduction="none")
    for i in range(5):
        assert byol_loss(p1[i:i + 1], p2[i:i + 1], t1[i:i + 1], t2[i:i + 1]).item() == pytest.approx(
            per[i].item(), rel=1e-6)
    grads = torch.autograd.grad(per[2], [p1, p2, t1, t2], allow_unused=True)
    for gp in grads[:2]:
        assert torch.count_nonzero(gp[[0, 1, 3, 4]]) == 0 and torch.count_nonzero(gp[2]) > 0
    assert all(gt is None or torch.count_nonzero(gt) == 0 for gt in grads[2:])  # stop-grad on the target


def test_byol_ema_hook_moves_the_target_by_tau() -> None:
    from fedrad.common.models import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", "byol", 32, proj_dim=16)
    keys = list(model.state_dict())
    obj = get_objective("byol")
    assert obj.momentum == 0.99
    obj.start(model)
    target = obj.target
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    assert len(online) == len(list(target.parameters()))
    assert all(torch.equal(o, t) for o, t in zip(online, target.parameters(), strict=True))
    before = [t.detach().clone() for t in target.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    obj.after_step(model)
    for b, o, t in zip(before, online, target.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * o.detach())
        assert float((t - b).abs().max()) == pytest.approx(0.01, rel=1e-3)  # moved by (1 - tau) * 1.0
    assert list(model.state_dict()) == keys  # the target is not in the model that crosses the wire
    assert not any(k.startswith("target") for k in keys)


def test_supcon_bf16_inputs_computed_in_fp32(emb) -> None:
    z1, z2 = emb
    ref = supcon_loss(z1.float(), z2.float(), None, 0.1)
    got = supcon_loss(z1.bfloat16(), z2.bfloat16(), None, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
