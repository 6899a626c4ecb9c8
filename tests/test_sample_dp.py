"""Sample-level DP (dp = "sample"): the GroupNorm model, per-image gradients that really are per image, the
site's ε ledger, and the refusals that keep the guarantee honest."""

from __future__ import annotations

import json

import pytest
import torch
from fake_site import make_fake_site

from fedrad.client.site.budget import OverBudget, SiteBudget, read_ledger
from fedrad.client.site.site_state import state_paths
from fedrad.client.training.sample_dp import SampleDP, epsilon_of, projected_epsilon
from fedrad.client.training.trainer import TrainConfig, split_indices, train_local
from fedrad.common.losses import get_objective
from fedrad.common.models import build_model, load_backbone, save_backbone
from fedrad.common.norms import has_batch_norm, opacus_safe, to_group_norm
from fedrad.common.run_config import RunConfig


def _dp_model(seed: int = 0, objective: str = "simsiam"):
    torch.manual_seed(seed)
    return build_model("test_resnet", objective, 32, proj_dim=16, norm="group")


def test_group_norm_model_is_the_same_everywhere_and_reloads(tmp_path):
    a, b = _dp_model(0), _dp_model(1)
    assert not has_batch_norm(a) and list(a.state_dict()) == list(b.state_dict())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in a.backbone.modules())
    sample = RunConfig(dp="sample", objective="simsiam", dp_noise=1.0)
    assert sample.model_norm == "group" and RunConfig().model_norm == "batch"
    save_backbone(a.backbone, tmp_path / "w.safetensors", {"model": "test_resnet", "norm": "group"})
    loaded = load_backbone("test_resnet", tmp_path / "w.safetensors")  # the metadata says GroupNorm
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), a.backbone.eval()(x))
    with pytest.raises(ValueError, match="norm"):
        build_model("test_resnet", "simsiam", 32, norm="layer")


def test_opacus_safe_restores_structure():
    model = _dp_model()
    keys = list(model.state_dict())
    with opacus_safe(model):
        assert list(model.state_dict()) != keys  # GroupNorms are wrapped while opacus trains
        assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", ["simsiam", "byol"])
def test_per_image_gradients_sum_both_views_and_ignore_the_batch(name: str):
    """What opacus clips is one image's gradient: its two views summed, unaffected by the other images."""
    from opacus import GradSampleModule

    model = _dp_model(objective=name)
    objective = get_objective(name)
    objective = type(objective)(joint_forward=False)
    objective.start(model)  # BYOL's target: a plain copy made before opacus hooks the model
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 1, 32, 32, generator=g)

    def per_sample(a, b):
        with opacus_safe(model):
            gsm = GradSampleModule(model, loss_reduction="mean")
            model.zero_grad()
            objective.loss(model, a, b).backward()
            out = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
            full = {n: p.grad.clone() for n, p in model.named_parameters()}
            for p in model.parameters():
                p.grad_sample = None
            gsm._close()
        return out, full

    batch, full = per_sample(v1, v2)
    alone, _ = per_sample(v1[2:3], v2[2:3])
    for name in alone:
        scale = float(full[name].abs().max()) + 1e-12
        # image 2's gradient does not depend on images 0, 1, 3 (a dependence, e.g. through BatchNorm, is of the
        # order of the gradient itself; 1e-3 of its scale leaves room for a CPU's float summation order)
        torch.testing.assert_close(batch[name][2], alone[name][0], rtol=1e-3, atol=1e-3 * scale, msg=name)
        # the mean loss's gradient is the mean of the per-image gradients (nothing double-counted or lost)
        torch.testing.assert_close(batch[name].mean(0), full[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_train_local_with_dp_accounts_and_refuses_unsound_setups(mode: str):
    data = make_fake_site(n=40)
    cfg = TrainConfig(objective="simsiam", steps=4, batch_size=8, device="cpu")
    model = _dp_model()
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode)
    result = train_local(model, data, cfg, progress=False, dp=dp)
    assert list(model.state_dict()) == keys
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # ghost mode switches it off during a step only
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    (sigma, q, steps), = result.dp_history
    n_train = len(split_indices(data)[0])  # the held-out patients are not sampled
    assert sigma == 1.0 and steps == 4 and q == pytest.approx(8 / n_train)
    assert result.dp_epsilon == pytest.approx(epsilon_of(result.dp_history, 1e-5)) and result.dp_epsilon > 0
    # the same ε as every other mode (the hooks mode's included) after the same steps: the mode is not accounted
    assert result.dp_epsilon == projected_epsilon(SampleDP(1.0, 1.0, 1e-5), n_train, 8, 4)
    # a second call continues the same history: epsilon grows
    again = train_local(model, data, cfg, progress=False, dp=SampleDP(1.0, 1.0, 1e-5, history=result.dp_history))
    assert again.dp_history[-1][2] == 8 and again.dp_epsilon > result.dp_epsilon
    with pytest.raises(ValueError, match="without BatchNorm"):
        train_local(build_model("test_resnet", "simsiam", 32), data, cfg, progress=False, dp=dp)
    with pytest.raises(ValueError, match="per-sample objective"):
        train_local(build_model("test_resnet", "simclr", 32, norm="group"), data,
                    TrainConfig(objective="simclr", steps=1, device="cpu"), progress=False, dp=dp)


def test_byol_trains_under_sample_dp_with_its_target_outside_opacus(monkeypatch):
    """BYOL with dp=sample: opacus trains the online network only; the EMA target is a separate GroupNorm copy
    that gets no gradients and never enters the state_dict that is sent."""
    from fedrad.common.losses.byol import BYOL

    started: list[BYOL] = []
    original_start = BYOL.start

    def spy(self, model):
        started.append(self)
        original_start(self, model)

    monkeypatch.setattr(BYOL, "start", spy)
    data = make_fake_site(n=40)
    model = _dp_model(objective="byol")
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, data, TrainConfig(objective="byol", steps=4, batch_size=8, device="cpu"),
                         progress=False, dp=SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    assert list(model.state_dict()) == keys and result.dp_epsilon > 0 and result.dp_history[-1][2] == 4
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    (objective,) = started
    assert not objective.joint_forward  # the views ran separately, so opacus summed them per image
    target = objective.target
    assert not has_batch_norm(target)
    assert all(not p.requires_grad and p.grad is None and getattr(p, "grad_sample", None) is None
               for p in target.parameters())
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    start = [before[k] for k in keys if k.startswith(("backbone.", "projector.")) and k in dict(
        model.named_parameters())]
    # the target moved from the start weights towards the trained ones, but lags them (EMA)
    assert any(not torch.equal(t, s0) for t, s0 in zip(target.parameters(), start, strict=True))
    assert any(not torch.equal(t, o) for t, o in zip(target.parameters(), online, strict=True))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_draw_still_takes_a_noise_step(mode: str):
    data = make_fake_site(n=40)
    model = _dp_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    # q = 1/40 per image: most steps draw no image at all, yet each step adds noise and is accounted
    result = train_local(model, data, TrainConfig(objective="simsiam", steps=3, batch_size=1, device="cpu",
                                                  optimizer="sgd", weight_decay=0.0),
                         progress=False, dp=SampleDP(1.0, 1.0, 1e-5, grad_sample_mode=mode))
    assert result.dp_history[-1][2] == 3
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters())


def test_ledger_round_trip_and_corruption_is_loud(tmp_path):
    state = state_paths({"state-dir": str(tmp_path / "state")})
    budget = SiteBudget(state, 1e-5)
    assert budget.spent() == 0.0
    a = budget.plan([(1.0, 0.1, 10)], flower_run_id=1, message_id="m1", statement="s", run_key="run-a")
    assert a.epsilon == pytest.approx(epsilon_of([(1.0, 0.1, 10)], 1e-5))
    assert budget.record(a.entry_id, [(1.0, 0.1, 10)]) == pytest.approx(a.epsilon)
    b = budget.plan([(2.0, 0.1, 5)], flower_run_id=2, message_id="m1", statement="t", run_key="run-a")
    both = epsilon_of([(1.0, 0.1, 10), (2.0, 0.1, 5)], 1e-5)
    assert b.epsilon == pytest.approx(both) and budget.spent() == pytest.approx(both)
    entries = read_ledger(state.ledger)["entries"]
    assert [e["status"] for e in entries.values()] == ["recorded", "planned"]  # same run-key: two entries
    assert state.ledger.stat().st_mode & 0o777 == 0o600
    # fewer steps taken than planned: the entry holds what was taken
    assert budget.record(b.entry_id, [(2.0, 0.1, 3)]) == pytest.approx(epsilon_of([(1.0, 0.1, 10), (2.0, 0.1, 3)],
                                                                                 1e-5))
    limited = SiteBudget(state, 1e-5, limit=budget.spent() + 1e-6)
    refused = limited.plan([(1.0, 0.1, 10)], flower_run_id=3, message_id="m", statement="s")
    assert isinstance(refused, OverBudget) and refused.epsilon > refused.limit
    assert len(read_ledger(state.ledger)["entries"]) == 2  # a refused plan writes nothing
    more = projected_epsilon(SampleDP(1.0, 1.0, 1e-5, history=[(1.0, 0.1, 10)]), 100, 10, 10)
    assert more > a.epsilon
    # merging steps of equal (σ, q) is exact: RDP adds up
    assert epsilon_of([(1.0, 0.1, 4), (1.0, 0.1, 6)], 1e-5) == pytest.approx(epsilon_of([(1.0, 0.1, 10)], 1e-5))
    # a format-2 ledger (one history per run-key) still counts
    state.ledger.write_text(json.dumps({"format": 2, "runs": {"old": {"history": [[1.0, 0.1, 10]]}}}))
    assert budget.spent() == pytest.approx(a.epsilon)
    state.ledger.write_text("{not json")
    with pytest.raises(ValueError, match="DP ledger is unreadable"):
        budget.spent()


def test_config_checks():
    RunConfig(dp="sample", objective="simsiam", dp_noise=1.0)
    RunConfig(dp="sample", objective="byol", dp_noise=1.0)
    for objective in ("simclr", "supcon", "micle"):
        with pytest.raises(ValueError, match="couples the images of a batch"):
            RunConfig(dp="sample", objective=objective, dp_noise=1.0)
    with pytest.raises(ValueError, match="fedprox"):
        RunConfig(dp="sample", objective="simsiam", dp_noise=1.0, strategy="fedprox")
    with pytest.raises(ValueError, match="secagg"):
        RunConfig(dp="sample", objective="simsiam", dp_noise=1.0, secagg=True)
    with pytest.raises(ValueError, match="cannot convert"):
        from timm.layers import BatchNormAct2d

        to_group_norm(torch.nn.Sequential(BatchNormAct2d(8)))


@pytest.mark.parametrize("mode", ["ew", "functorch"])
def test_grad_sample_modes_give_the_hooks_per_image_gradients(mode: str):
    """Every GRAD_SAMPLE_MODES entry hands opacus's optimizer the same per-image gradients (both views
    summed) as the hooks mode, so clipping, noise and accounting are unchanged by the choice."""
    from fedrad.client.training.sample_dp import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, DPTraining

    assert DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES and mode in GRAD_SAMPLE_MODES
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 1, 32, 32, generator=g)

    def per_image(grad_mode: str) -> dict[str, torch.Tensor]:
        model = _dp_model()
        objective = type(get_objective("simsiam"))(joint_forward=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with opacus_safe(model):
            run = DPTraining(model, opt, SampleDP(1.0, 1.0, 1e-5, grad_sample_mode=grad_mode), 40, 4, "cpu",
                             objective, grad_mode)
            run.optimizer.zero_grad(set_to_none=True)
            run.loss(v1, v2).backward()
            out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
            run.close()
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        return out

    want, got = per_image("hooks"), per_image(mode)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and value.shape[0] == 4  # one gradient per image
        scale = float(value.abs().max()) + 1e-12
        torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-4 * scale, msg=name)


def _one_dp_step(mode: str, objective_name: str, clip: float, views, noise: float = 1e-6):
    """One DPTraining step of `mode` on a fresh seeded model (SGD lr 1, the same seeded noise generator):
    (p.grad the optimizer applied = (clipped sum + noise) / expected batch, per parameter; each image's
    gradient norm, from the hooks mode's p.grad_sample, None for other modes)."""
    from fedrad.client.training.sample_dp import DPTraining

    model = _dp_model(objective=objective_name)
    objective = type(get_objective(objective_name))(joint_forward=False)
    objective.start(model)
    with opacus_safe(model):
        run = DPTraining(model, torch.optim.SGD(model.parameters(), lr=1.0),
                         SampleDP(noise, clip, 1e-5, grad_sample_mode=mode), 40, 4, "cpu", objective, mode)
        run.optimizer.generator = torch.Generator().manual_seed(11)
        run.optimizer.zero_grad(set_to_none=True)
        run.loss(*views).backward()
        norms = None
        if mode == "hooks":
            per_image = torch.cat([p.grad_sample.reshape(len(views[0]), -1) for p in model.parameters()], 1)
            norms = per_image.norm(dim=1)
        run.step()
        applied = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        run.close()
    return applied, norms


@pytest.mark.parametrize("objective_name", ["simsiam", "byol"])
def test_ghost_clipping_gives_the_hooks_mode_clipped_sum(objective_name: str):
    """Grad-sample mode "ghost" never builds per-image weight gradients, yet the step it hands the optimizer is
    the hooks mode's: both views summed per image, flat clipping over all layers (images below and above the
    clip), the clipped sum, opacus's noise (same generator) and 1/expected-batch scaling."""
    g = torch.Generator().manual_seed(0)
    views = (torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 1, 32, 32, generator=g))
    _, norms = _one_dp_step("hooks", objective_name, 1e9, views)
    clip = float(norms.sort().values[1:3].mean())  # between the 2nd and 3rd image's norm
    assert (norms < clip).sum() == 2 and (norms > clip).sum() == 2
    steps = {}
    for noise in (1e-6, 1.0):  # the clipped sum alone (noise negligible), then with opacus's noise
        want, _ = _one_dp_step("hooks", objective_name, clip, views, noise)
        steps[noise] = got = _one_dp_step("ghost", objective_name, clip, views, noise)[0]
        assert list(got) == list(want)
        for name, value in want.items():
            scale = float(value.abs().max()) + 1e-12
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the clip bound the step: without it the two large images would make it larger
    unclipped, _ = _one_dp_step("ghost", objective_name, 1e9, views)
    assert sum(float(v.square().sum()) for v in unclipped.values()) > 1.5 * sum(
        float(v.square().sum()) for v in steps[1e-6].values())


def test_ghost_clipping_refuses_layers_it_cannot_clip():
    """A trained parameter ghost clipping has no exact per-image norm for is refused when the step is set up,
    never trained with an unclipped gradient."""
    from timm.layers import StdConv2d
    from torch import nn

    from fedrad.client.training.sample_dp import DPTraining

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.scale = nn.Parameter(torch.ones(1))  # used in forward, but owned by no supported layer

        def forward(self, x):
            return self.conv(x) * self.scale

    cases = {"LayerNorm": nn.Sequential(nn.Flatten(), nn.LayerNorm(16)),
             "StdConv2d": nn.Sequential(StdConv2d(1, 4, 3)),  # a Conv2d subclass that transforms its weight
             "groups=2": nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)),
             "Scaled": Scaled()}
    for what, model in cases.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="ghost") as info:
            DPTraining(model, opt, SampleDP(1.0, 1.0, 1e-5, grad_sample_mode="ghost"), 40, 4, "cpu", None, "ghost")
        assert what in str(info.value), str(info.value)
    # what it supports is accepted, and closing leaves the model as it was
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    run = DPTraining(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     SampleDP(1.0, 1.0, 1e-5, grad_sample_mode="ghost"), 40, 4, "cpu", None, "ghost")
    run.close()
    assert all(p.requires_grad for p in model.parameters()) and not any(m._forward_hooks for m in model.modules())
