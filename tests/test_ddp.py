"""Several processes at one site (fedrad.client.training.ddp): 2 gloo ranks on CPU compute the update of one process
on the same global batch, and a rank that dies fails the round without hanging it."""

from __future__ import annotations

import copy
import multiprocessing
import os

import pytest
import torch
from fake_site import make_fake_site

from fedrad.client.training.ddp import DistributedTrainingError, rank_slices, train_distributed
from fedrad.client.training.trainer import TrainConfig, split_indices, train_local
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


def test_one_process_is_the_plain_path_and_rank_slices_cover_the_batch() -> None:
    data = make_fake_site(n=24, size=32)
    torch.manual_seed(0)
    a = build_model("test_resnet", "simclr", 32, proj_dim=16, norm="group")
    b = copy.deepcopy(a)
    assert train_distributed(a, data, _cfg(), procs=1).losses == train_local(b, data, _cfg(), progress=False).losses
    assert rank_slices(5, 2) == [(0, 3), (3, 5)] and rank_slices(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert rank_slices(1, 2) == [(0, 1), (1, 1)] and rank_slices(0, 2) == [(0, 0), (0, 0)]  # a Poisson draw may be tiny


CLIP = 5.0  # per-image gradient norms of this model at init are ~2-90: dp-clip 5 clips some images, not all


def _dp_runs(noise: float, procs: int, clip: float = CLIP, steps: int = 2, mode: str = "ghost"):
    """(start weights, trained weights, result) of a seeded sample-level DP run of `procs` processes: SimSiam,
    GroupNorm, `mode` per-image gradients, SGD; the Poisson draws and the noise use SampleDP.seed (tests only)."""
    from fedrad.client.training.sample_dp import SampleDP

    data = make_fake_site(n=40, size=32)
    torch.manual_seed(0)
    model = build_model("test_resnet", "simsiam", 32, proj_dim=16, norm="group")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg("simsiam", optimizer="sgd", lr=0.05, steps=steps)
    dp = SampleDP(noise, clip, 1e-5, grad_sample_mode=mode, seed=11)
    result = train_distributed(model, data, cfg, procs=procs, dp=dp)
    return start, {k: v.clone() for k, v in model.state_dict().items()}, result


@pytest.mark.parametrize("mode", ["ghost", pytest.param("hooks", marks=pytest.mark.slow)])
def test_sample_dp_over_two_gloo_ranks_is_one_process_dp_sgd(mode: str) -> None:
    """dp = "sample" over 2 gloo ranks: one Poisson draw of the global batch per step, per-image clipping on each
    rank's slice, the noise added once, one accountant. (a) With (almost) no noise, 2 steps: the update equals
    one process's on the same draws, clipping included (dp-clip 5 clips some images here, not all). (b) With
    loud noise and the same noise seed, 1 step: it still equals one process's, and the update's noise has std
    dp-noise x dp-clip / the GLOBAL expected batch (noise per rank would be x sqrt(2), per-rank scaling x 2).
    Seeded (SampleDP.seed), so deterministic: nothing here can flake. `mode`: fedrad's ghost clipping
    (DistributedDPOptimizerFastGradientClipping) or opacus's hooks (DistributedDPOptimizer)."""
    from fedrad.client.training.sample_dp import SampleDP, projected_epsilon

    sigma, lr = 100.0, 0.05
    start, one_clean, one_clean_r = _dp_runs(1e-6, 1, mode=mode)
    _, two_clean, two_clean_r = _dp_runs(1e-6, 2, mode=mode)
    _, one_noisy, one_noisy_r = _dp_runs(sigma, 1, steps=1, mode=mode)
    _, two_noisy, two_noisy_r = _dp_runs(sigma, 2, steps=1, mode=mode)
    # Each tensor's update to 1e-3 of its largest element: float reduction order (per-image gradients of a
    # slice of 6 vs a batch of 12, then summed over ranks) gives ~3e-5 after one step, ~3e-4 after two (step 2
    # starts from weights that differ at float level); a lost image or a wrong scale would be >= 8 % and 50 %.
    for one, two in ((one_clean, two_clean), (one_noisy, two_noisy)):
        assert max(float((one[k] - start[k]).abs().max()) for k in start) > 1e-3  # a real update is compared
        for k, v in one.items():
            update = float((v - start[k]).abs().max())
            assert float((two[k] - v).abs().max()) <= 1e-3 * update + 1e-8, k
    for one_r, two_r in ((one_clean_r, two_clean_r), (one_noisy_r, two_noisy_r)):
        assert two_r.examples == one_r.examples > 0 and two_r.steps == one_r.steps
        assert two_r.losses == pytest.approx(one_r.losses, rel=1e-3, abs=1e-6)
        assert two_r.dp_history == one_r.dp_history  # one accountant: the site's (sigma, q, steps), not per rank
    # the site's ε after the round: one process's, from the site's q (global batch / the site's training images)
    n_train = len(split_indices(make_fake_site(n=40, size=32))[0])
    assert two_noisy_r.dp_epsilon == pytest.approx(one_noisy_r.dp_epsilon, rel=1e-9)
    assert two_noisy_r.dp_epsilon == pytest.approx(projected_epsilon(SampleDP(sigma, CLIP, 1e-5), n_train, 12, 1),
                                                   rel=1e-9)
    # One step of timm's SGD (Nesterov, momentum 0.9) moves a weight by -lr x 1.9 x its gradient; at this noise
    # the clipped mean gradient and weight decay are < 1e-3 of the noise, so the update is the noise.
    noise = torch.cat([(two_noisy[k] - start[k]).flatten() / (-lr * 1.9) for k in start
                       if start[k].is_floating_point()])
    assert noise.numel() > 100_000
    expected_batch = round(12 / n_train * n_train)  # q x training images
    assert float(noise.std()) == pytest.approx(sigma * CLIP / expected_batch, rel=0.02)


def test_a_rank_with_an_empty_slice_adds_a_zero_gradient_and_still_joins_the_step() -> None:
    """A Poisson draw smaller than the ranks (here 1 image, 2 ranks): rank 1's slice is empty; it backpropagates
    a blank image with weight 0 (every per-image gradient exactly 0, as one process's empty draw) and reports
    the global batch's loss from the ranks' sum."""
    import numpy as np

    from fedrad.client.training.sample_dp import DPTraining, SampleDP
    from fedrad.common.losses import get_objective

    class Rank1Of2:
        rank, world = 1, 2

        def slice(self, n: int) -> tuple[int, int]:
            return rank_slices(n, self.world)[self.rank]

        def sum(self, t: torch.Tensor) -> torch.Tensor:
            return t + 0.75  # rank 0's share: its image's loss x 1

    torch.manual_seed(0)
    model = build_model("test_resnet", "simsiam", 32, proj_dim=16, norm="group")
    run = DPTraining.open(model, torch.optim.SGD(model.parameters(), lr=0.1), SampleDP(1.0, 1.0, 1e-5),
                          get_objective("simsiam"), 40, 4, torch.device("cpu"))
    try:
        run.ranks = Rank1Of2()
        views = (torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
        loss, shown, n = run.batch_loss(np.arange(1), lambda anchors: views)
        assert n == 1 and float(shown) == pytest.approx(0.75)
        loss.backward()
        clipped, norms = run.ghost.clipped_sum(1.0)
        assert float(norms.abs().max()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in clipped)
    finally:
        run.close()


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("ddp-site")
    (site,) = write_synthetic_sites(root, n_sites=1, patients_per_site=8, images_per_patient=(1, 2), size=48, seed=4)
    return site


def test_node_with_two_procs_answers_once_and_spends_one_epsilon(tmp_path, dicom_site) -> None:
    """Through the site's real train handler (node-config ddp-procs = 2): one plain reply with the trained
    arrays; a dp = "sample" run trains over the 2 ranks too and the site's ledger gets ONE entry with the
    round's steps, ε that of one process (the worker writes it; the ranks never touch the ledger)."""
    import json

    from federation_harness import TINY_RUN
    from test_site_policy import _context, _dp_run, _message, _refusals

    from fedrad.client.app.policy_mod import site_policy_mod
    from fedrad.client.app.task import handle_train
    from fedrad.client.site.site_state import state_paths
    from fedrad.client.training.sample_dp import epsilon_of
    from fedrad.common.run_config import RunConfig

    run = dict(TINY_RUN, **{"local-steps": 2})
    ctx = _context(tmp_path, dicom_site, run)
    ctx.node_config["ddp-procs"] = "2"
    reply = site_policy_mod(_message(RunConfig.from_flower(run)), ctx, handle_train)
    assert not reply.has_error() and reply.content["metrics"]["steps"] == 2
    ctx = _context(tmp_path, dicom_site, _dp_run())
    ctx.node_config["ddp-procs"] = "2"
    reply = site_policy_mod(_message(RunConfig.from_flower(_dp_run())), ctx, handle_train)
    assert not reply.has_error() and reply.content["metrics"]["steps"] == 2 and _refusals(tmp_path) == []
    (entry,) = json.loads(state_paths(ctx.node_config).ledger.read_text())["entries"].values()
    ((sigma, q, steps),) = entry["history"]
    assert entry["status"] == "recorded" and (sigma, steps) == (1.0, 2) and 0 < q <= 1
    assert reply.content["metrics"]["dp_epsilon"] == pytest.approx(epsilon_of([(1.0, q, 2)], 1e-5), rel=1e-6)
