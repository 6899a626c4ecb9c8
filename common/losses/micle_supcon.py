"""MICLe + SupCon: a patient's other images AND the images sharing the weak header label are positives.

On real chest X-rays SupCon on header labels helped most at 10 % labels and MICLe most at 25-100 %; the union
of both positive sets asks the embedding to respect both (the same patient across studies and views, and the
same view / body part / sex / age bucket across patients). The trainer pairs each anchor with another image
of its patient (as for MICLe) and passes both the label ids and the patient group ids; one multi-positive
NT-Xent over the union, so no weighting between two losses has to be tuned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedrad.common.losses.base import Batch, Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(eq=False)
class MICLeSupCon(Objective):
    name = "micle+supcon"
    positives = "patient+labels"

    def batch_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss(model, *batch.views, batch.labels, batch.groups)

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None,
             groups: Tensor | None = None) -> Tensor:
        from fedrad.common.losses.ntxent import supcon_loss

        if labels is None or groups is None:
            raise ValueError("micle+supcon needs label ids and patient group ids")
        z1, z2 = self.embed_pair(model, view1, view2)
        return supcon_loss(z1, z2, labels, self.temperature, groups=groups)
