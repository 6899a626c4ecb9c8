"""BYOL (Grill et al. 2020): the online network (backbone, projector, predictor) predicts the projection of
the other view by a momentum target network (an EMA copy of backbone and projector, never trained by
gradients). No negatives, so each image's loss depends only on its own two views (per-sample decomposable,
usable with `dp = "sample"` on a GroupNorm model).

The target is not part of the model: it lives on this objective instance for one `train_local` call and is
started (`start`) as a copy of the model the call begins with, then moved after every optimizer step
(`after_step`). In a federated round that means the target is re-initialised from the received global
weights at the start of each local round: only the online network is averaged by the coordinator (the
state_dict sent is exactly `build_model(..., "byol")`'s), and nothing of the target leaves the site or has
to be kept between the per-message ClientApp processes. Under opacus the target is a separate module that
the GradSampleModule never sees, and it runs under `no_grad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective
from fedrad.common.losses.simsiam import predict_pair

if TYPE_CHECKING:
    from torch import Tensor, nn


def byol_loss(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, reduction: str = "mean") -> Tensor:
    """Per sample 2 - 2 cos(p1, sg(t2)) and 2 - 2 cos(p2, sg(t1)), averaged over the two directions (the
    paper sums them: a constant factor 2). `reduction` "mean" (over the batch) or "none"."""
    import torch.nn.functional as F

    per = 2.0 - (F.cosine_similarity(p1.float(), t2.detach().float(), dim=1)
                 + F.cosine_similarity(p2.float(), t1.detach().float(), dim=1))
    return per.mean() if reduction == "mean" else per


@dataclass(eq=False)
class BYOL(Objective):
    name = "byol"
    per_sample = True

    # tau: after every step target <- tau * target + (1 - tau) * online. Constant: local rounds are short,
    # so the paper's cosine ramp to 1 over a long run has no room here.
    momentum: float = 0.99

    def __post_init__(self) -> None:
        self._target: nn.Module | None = None
        self._pairs: list[tuple[Tensor, Tensor]] = []

    def heads(self, num_features: int, proj_dim: int) -> dict[str, nn.Module]:
        from fedrad.common.losses.heads import predictor

        return {**super().heads(num_features, proj_dim), "predictor": predictor(proj_dim)}

    @property
    def target(self) -> nn.Module | None:
        """The momentum target network (backbone then projector), or None before `start`."""
        return self._target

    def start(self, model: nn.Module) -> None:
        """The target starts as a frozen copy of the model's backbone and projector."""
        import copy

        from torch import nn

        online = nn.Sequential(model.backbone, model.projector)
        target = copy.deepcopy(online).requires_grad_(False)
        for p in target.parameters():
            p.grad = None
        self._target = target
        self._pairs = list(zip(online.parameters(), target.parameters(), strict=True))

    def after_step(self, model: nn.Module) -> None:
        """EMA of the parameters; the target's BatchNorm statistics are its own (it runs in train mode)."""
        import torch

        if self._target is None:
            raise RuntimeError("byol: after_step before start")
        with torch.no_grad():
            for online, target in self._pairs:
                target.lerp_(online.detach(), 1.0 - self.momentum)

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.per_sample_loss(model, view1, view2).mean()

    def per_sample_loss(self, model: nn.Module, view1: Tensor, view2: Tensor) -> Tensor:
        """Each image's own loss (what sample-level DP differentiates per image)."""
        import torch

        if self._target is None:  # direct use outside the trainer
            self.start(model)
        z1, z2 = self.embed_pair(model, view1, view2)
        p1, p2 = predict_pair(self, model, z1, z2)
        target = self._target
        target.train(model.training)
        with torch.no_grad():
            if self.joint_forward:
                t = target(torch.cat([view1, view2], dim=0))
                t1, t2 = t[: view1.shape[0]], t[view1.shape[0]:]
            else:
                t1, t2 = target(view1), target(view2)
        return byol_loss(p1, p2, t1, t2, reduction="none")
