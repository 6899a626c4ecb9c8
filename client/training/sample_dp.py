"""Sample-level DP-SGD at a site (run-config `dp = "sample"`): opacus's per-image clipping and noise, an RDP
accountant; the site's ε ledger and budget over all runs are client/site/budget.py's.

The guarantee is per image at this site: the weights the site sends are nearly as likely whether or not any
one of its images was used. It holds only for objectives whose loss for one image depends on no other image
(the registry's `per_sample` ones: SimSiam, BYOL) and for models without BatchNorm
(`build_model(..., norm="group")`); `check_model` refuses the rest. Two things opacus's analysis assumes
are kept secret from the coordinator here: which images each step samples (Poisson sampling) and the
noise, both drawn from generators seeded with OS entropy rather than the run-config seed the coordinator
knows.

Over several processes (client/training/ddp.py, node-config ddp-procs > 1) one site is still one DP-SGD run:
one Poisson draw of the global batch per step (rank 0's secret seed, broadcast), each rank clips the
per-image gradients of its slice, opacus's Distributed optimizers sum the clipped gradients over the ranks
and add the noise once (rank 0's generator), scaled by the global expected batch; one accountant's history
comes back (rank 0's; every rank steps an identical one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedrad.client.site.budget import epsilon_of

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from fedrad.client.training.ddp import RankContext

# How per-image gradients are computed; every mode gives opacus's DPOptimizer the same per-image gradients
# (p.grad_sample), so clipping, noise and the accountant are the same. "ew": PyTorch's expanded weights
# around the whole per-image loss (no wasted batch weight gradient, grouped convolutions for the per-image
# weight gradients); "hooks": opacus's GradSampleModule hooks; "functorch": the same with torch.func per layer.
# "ghost" (client/training/ghost_clip.py) never builds per-image weight gradients: per-image norms from activations and
# output gradients, then the clipped sum as one re-weighted batch gradient per layer, handed to opacus's
# DPOptimizerFastGradientClipping for the same noise and scaling.
GRAD_SAMPLE_MODES = ("ew", "hooks", "functorch", "ghost")
DEFAULT_GRAD_SAMPLE_MODE = "ghost"  # the hooks mode's step to float tolerance, 1.5-3.1x its throughput (RESULTS.md)


@dataclass
class SampleDP:
    """DP-SGD settings for one call of `train_local`, and the accounting history of earlier calls."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)  # opacus RDP (sigma, q, steps)
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # how per-image gradients are computed (same values)
    # Tests only, never from a run config (the coordinator knows those): fixed seeds for the Poisson draw and
    # the noise, so a run over N processes can be compared with one process. None: secret (OS entropy).
    seed: int | None = None


def _secret_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _secret_generator(device: torch.device | str = "cpu", seed: int | None = None) -> torch.Generator:
    """A generator the coordinator cannot reproduce (the run-config seed is shared with it); `seed`: tests."""
    import torch

    seed = _secret_seed() if seed is None else seed
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return torch.Generator().manual_seed(seed)


def check_model(model: nn.Module, objective) -> None:
    """Refuse combinations where opacus's per-sample guarantee would not hold; ValueError says why."""
    from fedrad.common.losses import per_sample_objectives
    from fedrad.common.norms import has_batch_norm

    if not getattr(objective, "per_sample", False):
        raise ValueError(f"sample-level DP needs a per-sample objective ({', '.join(per_sample_objectives())}); "
                         f"'{objective.name}' compares the images of a batch with each other, so clipping one "
                         "image's gradient does not bound its influence")
    if has_batch_norm(model):
        raise ValueError("sample-level DP needs a model without BatchNorm (BatchNorm mixes the images of a "
                         "batch): build it with norm='group'")


def sample_rate(batch_size: int, n_train: int) -> float:
    """Poisson sampling rate q: the expected batch is `batch_size` of the site's `n_train` training images."""
    return min(1.0, batch_size / max(1, n_train))


def _per_image_loss_module(model: nn.Module, objective) -> nn.Module:
    """A module whose forward(view1, view2) is each image's loss: expanded weights differentiate a whole
    module call per sample, and the loss runs the model twice (one pass per view) and the predictor."""
    from torch import nn

    class PerImageLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, view1, view2):
            return objective.per_sample_loss(self.model, view1, view2)

    return PerImageLoss()


class DPTraining:
    """Opacus around one local training call: per-sample gradients, clipping, noise, accounting.

    Per-image gradients come from `mode` (GRAD_SAMPLE_MODES); opacus's hooks, when used, are on the model only
    for the duration (`close` removes them), so its state_dict is exactly the plain model's afterwards.
    `ranks` (client/training/ddp.py RankContext): this is one rank of a site's run over several processes;
    `n_train` and `batch_size` are the site's (global), so are the sampling rate and the expected batch.
    """

    def __init__(self, model: nn.Module, optimizer, dp: SampleDP, n_train: int, batch_size: int,
                 device: torch.device, objective=None, mode: str = DEFAULT_GRAD_SAMPLE_MODE,
                 ranks: RankContext | None = None) -> None:
        import warnings

        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import (
            DistributedDPOptimizer,
            DistributedDPOptimizerFastGradientClipping,
            DPOptimizer,
            DPOptimizerFastGradientClipping,
        )

        # The first layer's input needs no gradient, which makes torch warn on every step; harmless here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if dp.noise_multiplier <= 0 or dp.max_grad_norm <= 0:
            raise ValueError("sample-level DP needs dp-noise > 0 and dp-clip > 0")
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad-sample mode '{mode}' is not one of {', '.join(GRAD_SAMPLE_MODES)}")
        if mode == "ew" and not hasattr(objective, "per_sample_loss"):
            raise ValueError("grad-sample mode 'ew' needs the objective's per_sample_loss")
        self.dp = dp
        self.mode = mode
        self.model = model
        self.objective = objective
        self.ranks = ranks
        self._stack = None
        self.sample_rate = sample_rate(batch_size, n_train)
        self.expected_batch = max(1, round(self.sample_rate * n_train))
        self.gsm = None
        self.ghost = None
        self._loss_module = None
        optimizer_type = DPOptimizer
        if mode == "ew":
            self._loss_module = _per_image_loss_module(model, objective)
        elif mode == "ghost":
            from fedrad.client.training.ghost_clip import GhostClipping

            trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            self.ghost = GhostClipping(model, trained)  # refuses a model it cannot clip exactly
            optimizer_type = DPOptimizerFastGradientClipping  # noise + scaling of the clipped sum in p.grad
        else:
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                                        force_functorch=mode == "functorch")
        expected = self.expected_batch
        if ranks is not None:
            # opacus's Distributed optimizers: rank 0 alone adds the noise to its clipped sum, the ranks' sums
            # are all-reduced, then divided by expected_batch_size AND by the world size ("mean"): handing them
            # the global expected batch / world gives (sum of all clipped gradients + one noise) / global batch.
            optimizer_type = (DistributedDPOptimizerFastGradientClipping if optimizer_type is not DPOptimizer
                              else DistributedDPOptimizer)
            expected = self.expected_batch / ranks.world
        self.optimizer = optimizer_type(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                                     expected_batch_size=expected, loss_reduction="mean",
                                     generator=_secret_generator(device, dp.seed))
        self.accountant = RDPAccountant()
        self.accountant.history = [tuple(h) for h in dp.history]
        draw_seed = _secret_seed() if dp.seed is None else dp.seed + 1
        if ranks is not None:  # one Poisson draw for the site: every rank samples with rank 0's seed
            draw_seed = ranks.broadcast_int(draw_seed)
        self._sampler = _secret_generator("cpu", draw_seed)

    @classmethod
    def open(cls, model: nn.Module, optimizer, dp: SampleDP, objective, n_train: int, batch_size: int,
             device: torch.device, ranks: RankContext | None = None) -> DPTraining:
        """What train_local needs for a DP run: the checks, the objective with one forward per view (opacus
        would otherwise sum an image's two views into one per-image gradient; `.objective`), started before
        opacus touches the model (a target network must be a plain copy it never hooks), the model made
        opacus-safe until `close`."""
        import contextlib
        import dataclasses

        from fedrad.common.norms import opacus_safe

        check_model(model, objective)
        objective = dataclasses.replace(objective, joint_forward=False)
        objective.start(model)
        stack = contextlib.ExitStack()
        stack.enter_context(opacus_safe(model))
        try:
            run = cls(model, optimizer, dp, n_train, batch_size, device, objective, dp.grad_sample_mode, ranks)
        except BaseException:
            stack.close()
            raise
        run._stack = stack
        return run

    def batch_loss(self, anchors: np.ndarray, views_of) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the loss to backpropagate, the loss to report, images) of one step on the Poisson batch `anchors`.
        `views_of(anchors)` gives its two augmented views (a blank image for an empty draw). An empty batch
        still takes a (noise-only) step, as the accountant assumes: one blank image with weight 0 gives a
        per-image gradient of exactly 0. Over ranks every rank augments the whole global batch alike (the same
        generators) and backpropagates its own slice; the reported loss is the global batch's mean."""
        views = views_of(anchors)
        n = len(anchors)
        if self.ranks is None:
            loss = self.loss(*views)
            return (loss * 0.0, loss.detach() * 0.0, 0) if n == 0 else (loss, loss.detach(), n)
        start, end = self.ranks.slice(n)
        if end > start:
            loss = self.loss(*(v[start:end] for v in views))
            part = loss.detach() * (end - start)
        else:  # this rank's slice is empty: its per-image gradient sum is 0, it still joins the reduction
            blank = views[0][:1].detach() * 0.0
            loss = self.loss(blank, blank) * 0.0
            part = loss.detach()
        return loss, self.ranks.sum(part) / max(n, 1), n

    def draw(self, indices: np.ndarray) -> np.ndarray:
        """Poisson sampling: each training image joins this step independently with probability q."""
        import torch

        mask = torch.rand(len(indices), generator=self._sampler) < self.sample_rate
        return indices[mask.numpy()]

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss; its backward leaves each image's gradient (both views) in p.grad_sample
        (ghost: what `step` needs for the clipped sum)."""
        if self.ghost is not None:
            self.ghost.begin()  # the parameters need no autograd gradient; the images carry the backward
            return self.objective.loss(self.model, view1.detach().requires_grad_(), view2.detach().requires_grad_())
        if self._loss_module is None:
            return self.objective.loss(self.model, view1, view2)
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        for p in self.model.parameters():  # the last step's, already clipped and applied by the optimizer
            p.grad_sample = None
        per_image = call_for_per_sample_grads(self._loss_module, batch_size=view1.shape[0], loss_reduction="mean")
        return per_image(view1, view2).mean()

    def step(self) -> None:
        if self.ghost is not None:
            clipped, _ = self.ghost.clipped_sum(self.dp.max_grad_norm)
            self.optimizer.zero_grad(set_to_none=True)  # nothing but the clipped sum reaches the optimizer
            for p, grad in zip(self.ghost.params, clipped, strict=True):
                p.grad = grad
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.sample_rate)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant.history]

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.dp.delta)

    def close(self) -> None:
        if self.gsm is not None:
            self.gsm._close()  # removes the hooks and the per-sample gradient attributes
        if self.ghost is not None:
            self.ghost.remove()  # its hooks; the parameters require grad again
        for p in self.model.parameters():  # expanded weights leave p.grad_sample behind
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        if self._stack is not None:  # `open`'s opacus_safe: the model's own structure again
            self._stack.close()
            self._stack = None


def projected_epsilon(dp: SampleDP, n_train: int, batch_size: int, steps: int) -> float:
    """ε after `steps` more steps on a site of `n_train` training images (no opacus objects needed)."""
    q = sample_rate(batch_size, n_train)
    return epsilon_of(list(dp.history) + [(dp.noise_multiplier, q, int(steps))], dp.delta)


# The site's ledger and budget (every run's steps, one entry per message) live in client/site/budget.py.


__all__ = ["DEFAULT_GRAD_SAMPLE_MODE", "GRAD_SAMPLE_MODES", "DPTraining", "SampleDP", "check_model", "epsilon_of",
           "projected_epsilon", "sample_rate"]
