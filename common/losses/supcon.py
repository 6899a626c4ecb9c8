"""SupCon on weak header labels: images sharing (view, body part, sex, age bucket) are positives.

The labels come free with every DICOM, so a site needs no annotation to get label-aware pretraining.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrad.common.losses.base import Objective

if TYPE_CHECKING:
    from torch import Tensor, nn


class SupCon(Objective):
    name = "supcon"
    positives = "labels"

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        from fedrad.common.losses.ntxent import supcon_loss

        if labels is None:
            raise ValueError("supcon needs label ids (data.label_ids(label_fields))")
        z1, z2 = self.embed_pair(model, view1, view2)
        return supcon_loss(z1, z2, labels, self.temperature)
