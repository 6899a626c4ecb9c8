"""The objective registry: one objective per file (its heads, positives, DP eligibility, hooks), one dict.

Everything that depends on the objective reads it from here: the heads `build_model` puts on the backbone,
the trainer's views and labels, the objectives `dp = "sample"` accepts, the CLI's `--objective` choices.
Importing this package does not import torch (the CLI and the coordinator read it at start-up).
To add an objective: write `common/losses/<name>.py` with an `Objective` subclass, add it to `REGISTRY`.
"""

from __future__ import annotations

from fedrad.common.losses.base import Batch, Objective
from fedrad.common.losses.byol import BYOL
from fedrad.common.losses.micle import MICLe
from fedrad.common.losses.micle_supcon import MICLeSupCon
from fedrad.common.losses.simclr import SimCLR
from fedrad.common.losses.simsiam import SimSiam
from fedrad.common.losses.slices import NearbySlices
from fedrad.common.losses.supcon import SupCon

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (SimCLR, SupCon, MICLe, MICLeSupCon, SimSiam, BYOL,
                                                                  NearbySlices)}
OBJECTIVES = tuple(REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The registered class called `name` (case-insensitive); ValueError listing the choices otherwise."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown objective '{name}' (choose from {', '.join(OBJECTIVES)})") from None


def get_objective(name: str, temperature: float = 0.1) -> Objective:
    """A fresh instance of the objective called `name` (one per training or evaluation call)."""
    return objective_class(name)(temperature=float(temperature))


def per_sample_objectives() -> tuple[str, ...]:
    """The objectives whose per-image loss depends on no other image (the ones `dp = "sample"` accepts)."""
    return tuple(name for name, cls in REGISTRY.items() if cls.per_sample)


__all__ = ["OBJECTIVES", "REGISTRY", "Batch", "Objective", "get_objective", "objective_class",
           "per_sample_objectives"]
