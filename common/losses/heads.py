"""The MLP heads objectives put on top of the backbone (torch imported on call, so declaring is free).

Sizes are fixed functions of the backbone width and `proj_dim`, so the coordinator and every site build the
same state_dict names and shapes from (model, objective, proj_dim) alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """SimCLR/SimSiam-style head: Linear-BN-ReLU-Linear."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(d_in, d_hidden, bias=False),
        nn.BatchNorm1d(d_hidden),
        nn.ReLU(inplace=True),
        nn.Linear(d_hidden, d_out),
    )


def projector(num_features: int, proj_dim: int) -> nn.Sequential:
    """Backbone features -> the `proj_dim` space the loss compares in."""
    return mlp(num_features, max(num_features, 256), proj_dim)


def predictor(proj_dim: int) -> nn.Sequential:
    """Projection -> prediction of the other view's projection (SimSiam/BYOL's asymmetric bottleneck)."""
    return mlp(proj_dim, max(proj_dim // 2, 64), proj_dim)


__all__ = ["mlp", "predictor", "projector"]
