"""SimSiam (Chen & He 2021): symmetric negative cosine between predictor output and stop-grad projection.

No negatives, so each sample's loss depends only on its own two views (per-sample decomposable), which is
what per-sample gradient clipping for DP assumes (BatchNorm in train mode still couples the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, reduction: str = "mean") -> Tensor:
    """-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2 per sample; `reduction` "mean" or "none"."""
    per = -0.5 * (F.cosine_similarity(p1.float(), z2.detach().float(), dim=1)
                  + F.cosine_similarity(p2.float(), z1.detach().float(), dim=1))
    return per.mean() if reduction == "mean" else per


@dataclass(frozen=True)
class SimSiam(Objective):
    name: str = "simsiam"
    per_sample: bool = True

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        predictor = getattr(model, "predictor", None)
        if predictor is None:
            raise ValueError("simsiam needs a model with a predictor (build_model(..., objective='simsiam'))")
        z1, z2 = self.embed_pair(model, view1, view2)
        if not self.joint_forward:
            return simsiam_loss(predictor(z1), predictor(z2), z1, z2)
        n = z1.shape[0]
        p = predictor(torch.cat([z1, z2], dim=0))
        return simsiam_loss(p[:n], p[n:], z1, z2)

