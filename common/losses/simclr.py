"""SimCLR (Chen et al. 2020): two augmented views of one image; the rest of the batch are negatives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


class SimCLR(Objective):
    name = "simclr"

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        """NT-Xent: SupCon with one distinct label per pair (`labels` is ignored)."""
        from fedrad.common.losses.ntxent import supcon_loss

        z1, z2 = self.embed_pair(model, view1, view2)
        return supcon_loss(z1, z2, None, self.temperature)
