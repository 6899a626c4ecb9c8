"""Sample-level DP (dp = "sample"): the GroupNorm model, per-image gradients that really are per image, the
site's ε ledger, and the refusals that keep the guarantee honest."""

from __future__ import annotations

import json

import pytest
import torch
from fake_site import make_fake_site

from fedrad.client.sample_dp import SampleDP, epsilon_of, ledger_history, ledger_record, projected_epsilon
from fedrad.client.trainer import TrainConfig, split_indices, train_local
from fedrad.common.losses import get_objective
from fedrad.common.models import build_model, load_backbone, save_backbone
from fedrad.common.norms import has_batch_norm, opacus_safe, to_group_norm
from fedrad.common.run_config import RunConfig
from fedrad.server.privacy import check_privacy_config


def _dp_model(seed: int = 0, objective: str = "simsiam"):
    torch.manual_seed(seed)
    return build_model("test_resnet", objective, 32, proj_dim=16, norm="group")


def test_group_norm_model_is_the_same_everywhere_and_reloads(tmp_path):
    a, b = _dp_model(0), _dp_model(1)
    assert not has_batch_norm(a) and list(a.state_dict()) == list(b.state_dict())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in a.backbone.modules())
    assert RunConfig(dp="sample").model_norm == "group" and RunConfig().model_norm == "batch"
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
        # image 2's gradient does not depend on images 0, 1, 3
        torch.testing.assert_close(batch[name][2], alone[name][0], rtol=1e-3, atol=1e-4 * scale, msg=name)
        # the mean loss's gradient is the mean of the per-image gradients (nothing double-counted or lost)
        torch.testing.assert_close(batch[name].mean(0), full[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("mode", ["hooks", "ew"])
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
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    (sigma, q, steps), = result.dp_history
    n_train = len(split_indices(data)[0])  # the held-out patients are not sampled
    assert sigma == 1.0 and steps == 4 and q == pytest.approx(8 / n_train)
    assert result.dp_epsilon == pytest.approx(epsilon_of(result.dp_history, 1e-5)) and result.dp_epsilon > 0
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


def test_empty_poisson_draw_still_takes_a_noise_step():
    data = make_fake_site(n=40)
    model = _dp_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    # q = 1/40 per image: most steps draw no image at all, yet each step adds noise and is accounted
    result = train_local(model, data, TrainConfig(objective="simsiam", steps=3, batch_size=1, device="cpu",
                                                  optimizer="sgd", weight_decay=0.0),
                         progress=False, dp=SampleDP(1.0, 1.0, 1e-5))
    assert result.dp_history[-1][2] == 3
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters())


def test_ledger_round_trip_and_corruption_is_loud(tmp_path):
    path = tmp_path / "cache" / "dp_sample_ledger.json"
    assert ledger_history(path, "run-a") == []
    eps = ledger_record(path, "run-a", [(1.0, 0.1, 10)], 1e-5, server_round=1)
    assert eps == pytest.approx(epsilon_of([(1.0, 0.1, 10)], 1e-5))
    ledger_record(path, "run-b", [(2.0, 0.1, 5)], 1e-5, server_round=1)
    assert ledger_history(path, "run-a") == [(1.0, 0.1, 10)]
    assert json.loads(path.read_text())["runs"]["run-a"]["steps"] == 10
    more = projected_epsilon(SampleDP(1.0, 1.0, 1e-5, history=[(1.0, 0.1, 10)]), 100, 10, 10)
    assert more > eps
    path.write_text("{not json")
    with pytest.raises(ValueError, match="DP ledger is unreadable"):
        ledger_history(path, "run-a")


def test_config_checks():
    check_privacy_config(RunConfig(dp="sample", objective="simsiam", dp_noise=1.0))
    check_privacy_config(RunConfig(dp="sample", objective="byol", dp_noise=1.0))
    for objective in ("simclr", "supcon", "micle"):
        with pytest.raises(ValueError, match="couples the images of a batch"):
            check_privacy_config(RunConfig(dp="sample", objective=objective, dp_noise=1.0))
    with pytest.raises(ValueError, match="fedprox"):
        check_privacy_config(RunConfig(dp="sample", objective="simsiam", dp_noise=1.0, strategy="fedprox"))
    with pytest.raises(ValueError, match="secagg"):
        check_privacy_config(RunConfig(dp="sample", objective="simsiam", dp_noise=1.0, secagg=True))
    with pytest.raises(ValueError, match="cannot convert"):
        from timm.layers import BatchNormAct2d

        to_group_norm(torch.nn.Sequential(BatchNormAct2d(8)))


@pytest.mark.parametrize("mode", ["ew", "functorch"])
def test_grad_sample_modes_give_the_hooks_per_image_gradients(mode: str):
    """Every GRAD_SAMPLE_MODES entry hands opacus's optimizer the same per-image gradients (both views
    summed) as the hooks mode, so clipping, noise and accounting are unchanged by the choice."""
    from fedrad.client.sample_dp import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, DPTraining

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
