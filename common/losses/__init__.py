"""Pretraining objectives, one per file; simclr/supcon/micle share `ntxent.supcon_loss`."""

from __future__ import annotations

from fedrad.common.losses.base import Objective

OBJECTIVES = ("simclr", "supcon", "micle", "simsiam")


def get_objective(name: str, temperature: float = 0.1) -> Objective:
    """The objective called `name`; `temperature` is used by the NT-Xent family."""
    key = name.lower()
    if key == "simclr":
        from fedrad.common.losses.simclr import SimCLR as cls
    elif key == "supcon":
        from fedrad.common.losses.supcon import SupCon as cls
    elif key == "micle":
        from fedrad.common.losses.micle import MICLe as cls
    elif key == "simsiam":
        from fedrad.common.losses.simsiam import SimSiam as cls
    else:
        raise ValueError(f"unknown objective '{name}' (choose from {', '.join(OBJECTIVES)})")
    return cls(temperature=float(temperature))


__all__ = ["OBJECTIVES", "Objective", "get_objective"]
