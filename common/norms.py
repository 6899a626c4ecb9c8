"""BatchNorm -> GroupNorm for sample-level DP, and the two tweaks opacus's per-sample-gradient hooks need.

BatchNorm normalises each image with statistics of the whole batch, so one image's gradient depends on the
others and per-sample clipping would not bound its influence. A run with `dp = "sample"` therefore builds
its model with GroupNorm everywhere, identically on the coordinator and at every site (`build_model(...,
norm="group")`); the released weights record `norm=group` so loaders rebuild the same structure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

NORMS = ("batch", "group")
MAX_GROUPS = 32


def group_norm_for(bn: nn.Module) -> nn.GroupNorm:
    """A GroupNorm over the same channels (gcd(32, C) groups so any channel count divides evenly)."""
    channels = int(bn.num_features)
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels, eps=bn.eps, affine=bn.affine)


def to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every plain BatchNorm1d/2d in `module` (in place; the root too, returned) by a GroupNorm.

    Deterministic, so the coordinator and every site get the same state_dict names. BatchNorm subclasses
    that fuse an activation (timm's BatchNormAct2d) are refused rather than silently losing the activation.
    """
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return group_norm_for(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"cannot convert {type(module).__name__} to GroupNorm for sample-level DP; "
                         "use a model with plain BatchNorm layers (the resnet family, test_resnet)")
    for name, child in list(module.named_children()):
        setattr(module, name, to_group_norm(child))
    return module


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _CloneOutput(nn.Module):
    """Holds a GroupNorm and returns a copy of its output (see `opacus_safe`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).clone()


@contextlib.contextmanager
def opacus_safe(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily make `model` trainable under opacus's hooks, then restore its structure exactly.

    The hooks wrap a hooked layer's output in an autograd Function whose output must not be modified in
    place, so in-place activations are switched off and every GroupNorm's output is cloned (timm's residual
    blocks do `x += shortcut` on the norm output). The parameters are the same objects throughout, so
    the state_dict names are unchanged after the block.
    """
    flags = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    wrapped: list[tuple[nn.Module, str, nn.Module]] = []

    def wrap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, _CloneOutput(child))
                wrapped.append((parent, name, child))
            else:
                wrap(child)

    for m, _ in flags:
        m.inplace = False
    wrap(model)
    try:
        yield model
    finally:
        for parent, name, child in wrapped:
            setattr(parent, name, child)
        for m, flag in flags:
            m.inplace = flag


__all__ = ["NORMS", "has_batch_norm", "opacus_safe", "to_group_norm"]
