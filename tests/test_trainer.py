"""The local loop: every objective learns on structured synthetic images, seeded runs reproduce."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import timm.optim
import torch
from dicom_fixtures import shared_data
from fake_site import make_fake_site

from fedrad.client.training.trainer import (
    TrainConfig,
    _PairSampler,
    evaluate_local,
    make_optimizer,
    split_indices,
    train_local,
)
from fedrad.common.losses import REGISTRY, Batch, Objective
from fedrad.common.models import build_model


@pytest.fixture(scope="module")
def site():
    return make_fake_site(n=96, size=32)


def _run(site, objective: str, steps: int = 40, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model("test_resnet", objective, 32, proj_dim=32)
    cfg = TrainConfig(objective=objective, steps=steps, batch_size=32, lr=1e-3, seed=seed, device="cpu", **kw)
    return model, cfg, train_local(model, site, cfg, progress=False)


@pytest.mark.parametrize("objective", ["simclr", "supcon", "micle", "simsiam", "byol"])
def test_loss_falls(site, objective: str) -> None:
    _, _, res = _run(site, objective)
    assert res.steps == 40 and len(res.losses) == 40 and len(res.metrics) == 40
    assert res.examples == 40 * 32 and res.seconds > 0
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-3:])
    assert all(math.isfinite(v) for v in res.losses)
    assert last < first - 0.1, (first, last)


def test_seeded_runs_reproduce(site) -> None:
    _, _, a = _run(site, "simclr", steps=5, seed=3)
    _, _, b = _run(site, "simclr", steps=5, seed=3)
    _, _, c = _run(site, "simclr", steps=5, seed=4)
    assert a.losses == b.losses
    assert a.losses != c.losses


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_other_optimizers_and_resize(site, optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("test_resnet", "simclr", 24)
    cfg = TrainConfig(objective="simclr", steps=3, batch_size=16, lr=0.05, optimizer=optimizer, device="cpu",
                      image_size=24, grad_clip=None, label_fields="view,sex")
    before = [p.detach().clone() for p in model.parameters()]
    res = train_local(model, site, cfg, progress=False)
    assert res.steps == 3 and all(math.isfinite(v) for v in res.losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_bf16_autocast_on_cpu_when_asked(site) -> None:
    _, _, res = _run(site, "supcon", steps=2, amp="bf16")
    assert all(math.isfinite(v) for v in res.losses)


@pytest.mark.parametrize("objective", ["simclr", "micle", "byol"])
def test_evaluate_local(site, objective: str) -> None:
    model, cfg, _ = _run(site, objective, steps=3)
    model.train()
    m1 = evaluate_local(model, site, cfg)
    m2 = evaluate_local(model, site, cfg)
    assert m1 == m2  # deterministic views
    assert model.training  # mode restored
    assert set(m1) >= {"eval_loss", "alignment", "uniformity"}
    assert 0.0 <= m1["alignment"] <= 4.0 and -4.0 <= m1["uniformity"] <= 0.0


def test_split_is_by_patient(site) -> None:
    train, ev = split_indices(site)
    groups = site.group_ids()
    assert len(train) + len(ev) == len(site)
    assert not set(groups[train]) & set(groups[ev])
    small = make_fake_site(n=6)
    tr, ev = split_indices(small)
    assert len(tr) == len(ev) == 6


def test_micle_partner_is_same_patient_other_image(site) -> None:
    idx = np.arange(len(site))
    s = _PairSampler(site, idx, 16, torch.Generator().manual_seed(0), patient_pairs=True)
    groups = site.group_ids()
    for _ in range(10):
        a, p, _pos = s.next()
        assert (groups[a] == groups[p]).all() and (a != p).all()
        assert len(set(a.tolist())) == len(a)  # no repeats inside a batch
    # single-image patients fall back to the image itself (two augmentations of it)
    single = make_fake_site(n=8, per_patient=1)
    s = _PairSampler(single, np.arange(8), 4, torch.Generator().manual_seed(0), patient_pairs=True)
    a, p, _ = s.next()
    assert (a == p).all()


def test_tiny_site_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        train_local(build_model("test_resnet", "simclr", 32), make_fake_site(n=1), TrainConfig(steps=1))


def test_module_import_is_light() -> None:
    code = "import sys, fedrad.client.training.trainer; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_fedprox_term_pulls_towards_start(site) -> None:
    torch.manual_seed(0)
    base = build_model("test_resnet", "simclr", 32)
    start = {k: v.detach().clone() for k, v in base.state_dict().items()}
    drift = {}
    for mu in (0.0, 100.0):
        model = build_model("test_resnet", "simclr", 32)
        model.load_state_dict(start)
        cfg = TrainConfig(objective="simclr", steps=5, batch_size=16, lr=1e-2, optimizer="sgd", device="cpu")
        train_local(model, site, cfg, progress=False, proximal=(mu, start))
        drift[mu] = sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in model.named_parameters())
    assert drift[100.0] < drift[0.0]


def test_byol_loss_falls_on_real_radiographs(tmp_path) -> None:
    """Hannover chest X-rays (real PNGs, 71 patients): BYOL's loss falls and its EMA target moved."""
    from fedrad.client.site.site_data import load_site

    data = load_site(shared_data() / "hannover", 32, cache_dir=tmp_path / "cache", progress=False)
    torch.manual_seed(0)
    model = build_model("test_resnet", "byol", 32, proj_dim=32)
    keys = list(model.state_dict())
    res = train_local(model, data, TrainConfig(objective="byol", steps=8, batch_size=16, lr=2e-3, device="cpu"),
                      progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    assert np.mean(res.losses[-2:]) < np.mean(res.losses[:2]) - 0.3, res.losses
    assert list(model.state_dict()) == keys  # nothing of the target was added to what is sent


@pytest.mark.parametrize("optimizer,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                                           ("lars", timm.optim.Lars)])
def test_optimizers_are_timms_with_no_decay_on_biases_and_norms(optimizer: str, cls) -> None:
    model = build_model("test_resnet", "simsiam", 32)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer.upper(), lr=0.1, weight_decay=0.05))
    assert type(opt) is cls
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {0.0, 0.05}
    params = dict(model.named_parameters())
    assert by_decay[0.0] == {id(p) for p in params.values() if p.ndim <= 1}  # biases, norm weights
    assert by_decay[0.05] == {id(p) for p in params.values() if p.ndim > 1}
    if optimizer != "adamw":
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert opt.defaults.get("nesterov", False) == (optimizer == "sgd")  # as before: Nesterov SGD, plain LARS
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(model, TrainConfig(optimizer="adagrad"))


@dataclass(eq=False)
class _MeanIntensity(Objective):
    """A single-view objective (like a masked autoencoder): no pairs, the loss is a regression on one view."""

    name = "mean-intensity"
    positives = "none"
    n_views = 1
    per_sample = True
    steps_seen: int = 0

    def batch_loss(self, model, batch: Batch) -> torch.Tensor:
        (x,) = batch.views
        assert batch.labels is None
        return (model(x)[:, 0] - x.mean(dim=(1, 2, 3))).pow(2).mean()

    def after_step(self, model) -> None:
        self.steps_seen += 1


def test_single_view_objective_plugs_in_through_the_registry(site, monkeypatch) -> None:
    """The seam MAE-style objectives need: registered once, the model, trainer and evaluation follow."""
    monkeypatch.setitem(REGISTRY, "mean-intensity", _MeanIntensity)
    seen: list[_MeanIntensity] = []
    monkeypatch.setattr(_MeanIntensity, "start", lambda self, model: seen.append(self))
    torch.manual_seed(0)
    model = build_model("test_resnet", "mean-intensity", 32, proj_dim=8)
    cfg = TrainConfig(objective="mean-intensity", steps=12, batch_size=16, lr=3e-3, device="cpu")
    res = train_local(model, site, cfg, progress=False)
    assert seen[0].steps_seen == 12  # the after-step hook ran once per optimizer step
    assert np.mean(res.losses[-3:]) < np.mean(res.losses[:3])
    scores = evaluate_local(model, site, cfg)
    assert math.isfinite(scores["eval_loss"]) and math.isfinite(scores["alignment"])
