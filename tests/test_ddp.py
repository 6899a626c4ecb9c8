"""Several processes at one site (fedrad.client.training.ddp): 2 gloo ranks on CPU compute the update of one process
on the same global batch, and a rank that dies fails the round without hanging it."""

from __future__ import annotations

import copy
import multiprocessing
import os

import pytest
import torch
from fake_site import make_fake_site

from fedrad.client.training.ddp import DistributedTrainingError, train_distributed
from fedrad.client.training.trainer import TrainConfig, train_local
from fedrad.common.models import build_model


class DiesOnRank1(torch.nn.Module):
    """A model whose forward kills rank 1 outright (a worker lost mid-round: OOM killer, a driver crash)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            os._exit(3)
        return self.inner(x)


def _cfg(objective: str = "simclr", **kw) -> TrainConfig:
    return TrainConfig(**{"objective": objective, "steps": 3, "batch_size": 12, "device": "cpu", "seed": 0, **kw})


def test_two_gloo_ranks_equal_one_process(objective: str = "simclr") -> None:
    """Same init, data, seeds and global batch: losses and trained weights match the single-process run
    (GroupNorm model: exact on CPU; NT-Xent needs every rank's negatives). Passing objective="byol" checks a
    head that runs on the gathered projections too (passes; left out of CI for time: each spawn ~10-25 s)."""
    data = make_fake_site(n=40, size=32)
    torch.manual_seed(0)
    one = build_model("test_resnet", objective, 32, proj_dim=16, norm="group")
    two = copy.deepcopy(one)
    start = {k: v.clone() for k, v in one.state_dict().items()}
    # SGD: the update is the gradient itself (Adam's 1/sqrt(v) would amplify float reduction-order noise on
    # near-zero gradients up to a fraction of lr, hiding what is compared)
    # One step: the update of one global batch (over more steps BYOL's predictor amplifies float
    # reduction-order differences of ~1e-7 to ~1e-2 relative; simclr stays within 1e-4 over 3 steps).
    cfg = _cfg(objective, optimizer="sgd", lr=0.05, steps=1)
    single = train_local(one, data, cfg, progress=False)
    multi = train_distributed(two, data, cfg, procs=2)
    assert multi.steps == single.steps == 1 and multi.examples == single.examples
    assert multi.losses == pytest.approx(single.losses, rel=1e-4, abs=1e-5)
    moved = max(float((one.state_dict()[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4  # the comparison below is about a real update
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_dead_rank_fails_the_round_and_the_next_starts_clean() -> None:
    data = make_fake_site(n=24, size=32)
    torch.manual_seed(0)
    model = build_model("test_resnet", "simclr", 32, proj_dim=16, norm="group")
    dying = DiesOnRank1(copy.deepcopy(model))
    with pytest.raises(DistributedTrainingError, match="failed"):
        train_distributed(dying, data, _cfg(), procs=2)
    assert multiprocessing.active_children() == []  # rank 0, blocked in a collective, was stopped too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_distributed(model, data, _cfg(), procs=2)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_process_is_the_plain_path_and_sample_dp_refuses_ranks() -> None:
    from fedrad.client.training.ddp import RankContext

    data = make_fake_site(n=24, size=32)
    torch.manual_seed(0)
    a = build_model("test_resnet", "simclr", 32, proj_dim=16, norm="group")
    b = copy.deepcopy(a)
    assert train_distributed(a, data, _cfg(), procs=1).losses == train_local(b, data, _cfg(), progress=False).losses
    from fedrad.client.training.sample_dp import SampleDP

    with pytest.raises(ValueError, match="one process"):
        train_local(a, data, _cfg(), progress=False, dp=SampleDP(1.0, 1.0, 1e-5), dist_ctx=RankContext(0, 2))


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("ddp-site")
    (site,) = write_synthetic_sites(root, n_sites=1, patients_per_site=8, images_per_patient=(1, 2), size=48, seed=4)
    return site


def test_node_with_two_procs_answers_once_and_refuses_sample_dp(tmp_path, dicom_site) -> None:
    """Through the site's real train handler (node-config ddp-procs = 2): one plain reply with the trained
    arrays; a dp = "sample" run is refused with a fixed code (one process, one accountant)."""
    from federation_harness import TINY_RUN
    from test_site_policy import _assert_fixed_reply, _context, _dp_run, _message, _refusals

    from fedrad.client.app.policy_mod import site_policy_mod
    from fedrad.client.app.task import handle_train
    from fedrad.common.protocol import ErrorCode
    from fedrad.common.run_config import RunConfig

    run = dict(TINY_RUN, **{"local-steps": 2})
    ctx = _context(tmp_path, dicom_site, run)
    ctx.node_config["ddp-procs"] = "2"
    reply = site_policy_mod(_message(RunConfig.from_flower(run)), ctx, handle_train)
    assert not reply.has_error() and reply.content["metrics"]["steps"] == 2
    ctx = _context(tmp_path, dicom_site, _dp_run())
    ctx.node_config["ddp-procs"] = "2"
    reply = site_policy_mod(_message(RunConfig.from_flower(_dp_run())), ctx, handle_train)
    _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
    assert [r["rule"] for r in _refusals(tmp_path)] == ["ddp_procs"]
