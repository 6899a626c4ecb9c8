"""Nearby slices: the two views are two nearby slices of one CT/MR series (like MICLe's two images of one
patient, but along the volume).

Neighbouring slices show the same anatomy a few millimetres apart: a positive pair that augmentations cannot
make. The trainer groups each ordered series into blocks of SLICE_BLOCK_MM along the slice normal
(common/series.py `neighbour_groups`) and pairs an anchor with another slice of its block; an image outside
any ordered series (a radiograph, an unordered slice) is paired with a second augmentation of itself, as in
SimCLR. `labels` are the block ids, so two slices of one block in a batch are not pushed apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(eq=False)
class NearbySlices(Objective):
    name = "slices"
    positives = "slices"

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        from fedrad.common.losses.ntxent import supcon_loss

        z1, z2 = self.embed_pair(model, view1, view2)
        return supcon_loss(z1, z2, labels, self.temperature)
