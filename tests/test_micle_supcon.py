"""MICLe + SupCon: the union of same-patient and same-header-label positives, against the formula, its two
special cases, and training on real radiographs (Hannover: several images per patient, header view/sex)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dicom_fixtures import shared_data
from torch import nn

from fedrad.client.training.trainer import TrainConfig, _setup, _views_of, train_local
from fedrad.common.losses import REGISTRY, Batch, get_objective
from fedrad.common.losses.ntxent import supcon_loss
from fedrad.common.models import build_model

NAME = "micle+supcon"


def _np_union(z1: np.ndarray, z2: np.ndarray, labels: list[int], groups: list[int], t: float) -> float:
    """SupCon L_out (Khosla et al. eq. 2) as loops, a positive being a same label OR a same patient."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    lab, grp = list(labels) * 2, list(groups) * 2
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        denom = sum(math.exp(z[i] @ z[a] / t) for a in range(n2) if a != i)
        pos = [p for p in range(n2) if p != i and (lab[p] == lab[i] or grp[p] == grp[i])]
        total += -sum(math.log(math.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos)
    return total / n2


@pytest.fixture
def emb():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)


def test_registered_with_patient_pairs_and_labels() -> None:
    obj = get_objective(NAME, temperature=0.2)
    assert REGISTRY[NAME].positives == "patient+labels"
    assert obj.needs_labels and obj.pairing == "patient" and not obj.per_sample


def test_union_of_positives_matches_the_formula(emb) -> None:
    z1, z2 = emb
    labels, groups = torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([5, 6, 6, 7, 8, 8])
    got = get_objective(NAME, temperature=0.2).loss(nn.Identity(), z1, z2, labels, groups)
    want = _np_union(z1.numpy(), z2.numpy(), labels.tolist(), groups.tolist(), 0.2)
    assert got.item() == pytest.approx(want, rel=1e-6)  # float32 inside, as for supcon
    micle = get_objective("micle", temperature=0.2).loss(nn.Identity(), z1, z2, groups)
    supcon = get_objective("supcon", temperature=0.2).loss(nn.Identity(), z1, z2, labels)
    assert not math.isclose(got.item(), micle.item()) and not math.isclose(got.item(), supcon.item())


def test_special_cases_are_micle_and_supcon(emb) -> None:
    z1, z2 = emb
    labels, groups, distinct = torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([5, 6, 6, 7, 8, 8]), torch.arange(6)
    obj = get_objective(NAME, temperature=0.3)
    assert torch.allclose(obj.loss(nn.Identity(), z1, z2, labels, distinct), supcon_loss(z1, z2, labels, 0.3))
    assert torch.allclose(obj.loss(nn.Identity(), z1, z2, distinct, groups), supcon_loss(z1, z2, groups, 0.3))
    with pytest.raises(ValueError, match="group ids"):
        obj.batch_loss(nn.Identity(), Batch((z1, z2), labels))


def test_gradient_pulls_a_same_patient_pair_with_different_labels_together() -> None:
    """Row 0 and row 1 share a patient but not a label: only the union makes them positives."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(4, 8, generator=g, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g)
    labels, groups = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 2])
    loss = get_objective(NAME).loss(nn.Identity(), z1, z2, labels, groups)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient raises the pair's cosine similarity
        step = z1 - 0.05 * z1.grad
        before = torch.cosine_similarity(z1[0], z1[1], dim=0)
        after = torch.cosine_similarity(step[0], step[1], dim=0)
    assert after > before


def test_trains_on_real_radiographs_with_both_positives(tmp_path) -> None:
    from fedrad.client.site.site_data import load_site

    data = load_site(shared_data() / "hannover", 32, cache_dir=tmp_path / "cache", progress=False)
    torch.manual_seed(0)
    model = build_model("test_resnet", NAME, 32, proj_dim=32)
    cfg = TrainConfig(objective=NAME, steps=8, batch_size=16, lr=2e-3, device="cpu", label_fields="view,sex")
    st = _setup(model, data, cfg)
    anchors = np.arange(16)
    batch, _ = _views_of(st, data, anchors, anchors, None, 2)
    assert torch.equal(batch.labels, torch.from_numpy(data.label_ids(["view", "sex"])[anchors]))
    assert torch.equal(batch.groups, torch.from_numpy(data.group_ids()[anchors]))
    before = [p.detach().clone() for p in model.backbone.parameters()]
    res = train_local(model, data, cfg, progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    assert np.mean(res.losses[-2:]) < np.mean(res.losses[:2]), res.losses
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters(), strict=True))
