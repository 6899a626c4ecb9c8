"""The one interface the trainer sees: an objective turns two views (and optional labels) into a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True)
class Objective:
    """A pretraining objective.

    `needs_labels`: the trainer must pass weak header-label ids (supcon).
    `pairing`: how the trainer builds the second view: "augment" (two views of one image) or "patient"
    (another image of the same patient; micle), in which case `labels` are patient group ids.
    `per_sample`: each sample's loss depends on no other sample (the premise of per-sample DP clipping);
    True only for the non-contrastive objectives. BatchNorm still couples samples in train mode.
    `joint_forward`: both views in one forward pass (fast); False runs them separately, which per-sample
    DP needs so that opacus sums an image's two views into one per-image gradient.
    """

    name: str
    needs_labels: bool = False
    per_sample: bool = False
    pairing: str = "augment"
    temperature: float = 0.1
    joint_forward: bool = True

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def embed_pair(self, model: nn.Module, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Projections of both views in one forward pass (one BN batch over 2B, half the kernel launches)."""
        import torch

        if not self.joint_forward:
            return model(view1), model(view2)
        z = model(torch.cat([view1, view2], dim=0))
        return z[: view1.shape[0]], z[view1.shape[0]:]
