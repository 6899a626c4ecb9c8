"""MICLe (Azizi et al. 2021): the two views are two different images of the same patient.

The trainer builds the pairs (anchor + another image of the same patient, or two augmentations of one image
for single-image patients) and passes patient group ids as `labels`; with `patient_positives` every image of
the same patient in the batch is a positive, so two pairs from one patient are not pushed apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(eq=False)
class MICLe(Objective):
    name = "micle"
    positives = "patient"

    patient_positives: bool = True

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        from fedrad.common.losses.ntxent import supcon_loss

        z1, z2 = self.embed_pair(model, view1, view2)
        return supcon_loss(z1, z2, labels if self.patient_positives else None, self.temperature)
