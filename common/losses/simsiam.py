"""SimSiam (Chen & He 2021): symmetric negative cosine between predictor output and stop-grad projection.

No negatives, so each sample's loss depends only on its own two views (per-sample decomposable), which is
what per-sample gradient clipping for DP assumes (BatchNorm in train mode still couples the batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, reduction: str = "mean") -> Tensor:
    """-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2 per sample; `reduction` "mean" or "none"."""
    import torch.nn.functional as F

    per = -0.5 * (F.cosine_similarity(p1.float(), z2.detach().float(), dim=1)
                  + F.cosine_similarity(p2.float(), z1.detach().float(), dim=1))
    return per.mean() if reduction == "mean" else per


def predict_pair(objective: Objective, model: nn.Module, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """The predictor head on both projections (one call when the objective runs views jointly)."""
    import torch

    predictor = getattr(model, "predictor", None)
    if predictor is None:
        raise ValueError(f"{objective.name} needs a model with a predictor "
                         f"(build_model(..., objective='{objective.name}'))")
    if not objective.joint_forward:
        return predictor(z1), predictor(z2)
    n = z1.shape[0]
    p = predictor(torch.cat([z1, z2], dim=0))
    return p[:n], p[n:]


class SimSiam(Objective):
    name = "simsiam"
    per_sample = True

    def heads(self, num_features: int, proj_dim: int) -> dict[str, nn.Module]:
        from fedrad.common.losses.heads import predictor

        return {**super().heads(num_features, proj_dim), "predictor": predictor(proj_dim)}

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.per_sample_loss(model, view1, view2).mean()

    def per_sample_loss(self, model: nn.Module, view1: Tensor, view2: Tensor) -> Tensor:
        """Each image's own loss (what sample-level DP differentiates per image)."""
        z1, z2 = self.embed_pair(model, view1, view2)
        p1, p2 = predict_pair(self, model, z1, z2)
        return simsiam_loss(p1, p2, z1, z2, reduction="none")
