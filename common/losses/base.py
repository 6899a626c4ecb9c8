"""The one interface the trainer, the model builder, the privacy checks and the CLI see: an `Objective`.

A subclass declares, as class attributes, everything the rest of fedrad needs to know about it:

- `name`: the run-config / CLI name.
- `positives`: what the trainer treats as a positive pair, and so what it builds and passes as labels:
  "augment" (two augmentations of one image), "labels" (augment pairs, plus every image sharing the weak
  header label; labels = label ids), "patient" (the second view is another image of the same patient;
  labels = patient group ids), "patient+labels" (the second view is another image of the same patient, and
  every image of the same patient or sharing the header label is a positive; labels = label ids, groups =
  patient group ids), "slices" (the second view is a nearby slice of the same CT/MR series; labels = slice
  block ids), "none" (single-view objectives such as a masked autoencoder).
- `n_views`: how many augmented views of each image the trainer hands over (2; 1 for MAE-style).
- `per_sample`: each image's loss depends on no other image of the batch, so per-image gradient clipping
  bounds its influence (the premise of `dp = "sample"`). BatchNorm still couples samples in train mode.

and it owns its heads (`heads`) and optional hooks (`start` before the first step, `after_step` after each
optimizer step). An instance serves one training or evaluation call (`get_objective` makes a fresh one), so
per-call state such as BYOL's momentum target network lives on the instance and never in the model: the
state_dict that crosses the wire is exactly the one `build_model` gives the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor, nn

POSITIVES = ("augment", "labels", "patient", "patient+labels", "slices", "none")


@dataclass
class Batch:
    """One training step's input: `views[k]` is the k-th augmented view of the same images; `labels` holds
    label ids (positives "labels" and "patient+labels") or patient group ids (positives "patient"), else None;
    `groups` holds patient group ids for positives "patient+labels", else None."""

    views: tuple[Tensor, ...]
    labels: Tensor | None = None
    groups: Tensor | None = None


@dataclass(eq=False)
class Objective:
    """A pretraining objective. `temperature` is used by the NT-Xent family. `joint_forward`: both views in
    one forward pass (one BN batch over 2B, half the kernel launches); False runs them separately, which
    per-sample DP needs so that opacus sums an image's two views into one per-image gradient."""

    name: ClassVar[str] = ""
    positives: ClassVar[str] = "augment"
    n_views: ClassVar[int] = 2
    per_sample: ClassVar[bool] = False

    temperature: float = 0.1
    joint_forward: bool = True

    @property
    def needs_labels(self) -> bool:
        """The trainer must pass weak header-label ids (supcon, micle+supcon)."""
        return self.positives in ("labels", "patient+labels")

    @property
    def pairing(self) -> str:
        """How the trainer builds the second view: "patient" (another image of the same group: patient, or
        slice block for "slices") or "augment" (another augmentation of the same image)."""
        return "patient" if self.positives in ("patient", "patient+labels", "slices") else "augment"

    def heads(self, num_features: int, proj_dim: int) -> dict[str, nn.Module]:
        """The modules after the backbone, by attribute name (their state_dict prefix), in order.

        `model(x)` is `projector(backbone(x))`, so a contrastive objective keeps the projector.
        """
        from fedrad.common.losses.heads import projector

        return {"projector": projector(num_features, proj_dim)}

    def start(self, model: nn.Module) -> None:
        """Called once before the first step, with the model on its device and not yet wrapped by opacus."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to move an EMA target network towards the model)."""

    def batch_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """What the trainer calls. Two-view objectives implement `loss`; others (MAE) override this."""
        return self.loss(model, *batch.views, batch.labels)

    def loss(self, model: nn.Module, view1: Tensor, view2: Tensor, labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def embed_pair(self, model: nn.Module, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Projections of both views (one forward pass when `joint_forward`)."""
        import torch

        if not self.joint_forward:
            return model(view1), model(view2)
        z = model(torch.cat([view1, view2], dim=0))
        return z[: view1.shape[0]], z[view1.shape[0]:]


__all__ = ["POSITIVES", "Batch", "Objective"]
