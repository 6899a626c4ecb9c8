"""Grayscale timm backbones, the contrastive heads around them, and their safetensors files.

The file a site receives holds only the backbone's state_dict under timm's own key names, so it loads with
plain `timm.create_model(name, in_chans=1, num_classes=0).load_state_dict(load_file(path))` and nothing of
fedrad is needed to use the weights (ViTs also need the `img_size` they were trained at, which the file's
metadata records).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from torch import Tensor

# Names known to work here (in_chans=1, small inputs). Any other timm name is passed through to timm.
# `test_resnet` is timm's own 0.37M-parameter ResNet: fast enough for tests and CPU demos.
KNOWN_MODELS = ("test_resnet", "resnet10t", "resnet18", "resnet50", "vit_tiny_patch16_224",
                "vit_small_patch16_224")
TINY_MODEL = "test_resnet"


def _takes_img_size(name: str) -> bool:
    """Transformers fix their position embeddings to one input size, so they must be told it."""
    return name.split(".")[0].startswith(("vit_", "deit_", "eva", "test_vit"))


def create_backbone(name: str, in_chans: int = 1, image_size: int | None = None, norm: str = "batch") -> nn.Module:
    """A timm feature extractor (num_classes=0: pooled features, `.num_features` wide), never pretrained.

    `norm="group"` swaps BatchNorm for GroupNorm (the variant trained with sample-level DP).
    """
    import timm

    from fedrad.common.norms import NORMS, to_group_norm

    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}' (choose from {', '.join(NORMS)})")

    kwargs: dict = {"in_chans": in_chans, "num_classes": 0, "pretrained": False}
    if image_size is not None and _takes_img_size(name):
        kwargs["img_size"] = image_size
    try:
        backbone = timm.create_model(name, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model" is a RuntimeError; make it a clean CLI error
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown model '{name}' (try one of {', '.join(KNOWN_MODELS)})") from exc
        raise
    return to_group_norm(backbone) if norm == "group" else backbone


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MAX_CHECKPOINT_BYTES = 4 << 30  # read whole into memory by timm: a bound, as for a bundle's weights


def load_timm_checkpoint(name: str, path: str | os.PathLike, image_size: int | None = None,
                         norm: str = "batch") -> nn.Module:
    """A grayscale `name` backbone initialised from a local timm checkpoint (e.g. ImageNet weights fetched once).

    timm does the work, as it does for its own pretrained weights: `timm.models.load_state_dict` reads the file
    (safetensors, or a .pth/.pt/.bin state_dict through torch.load(weights_only=True); training checkpoints'
    `state_dict`/`model`/EMA entries and DDP prefixes unwrapped), then `create_model(pretrained=True,
    in_chans=1, num_classes=0)` with the state_dict as the pretrained source sums the RGB first convolution
    into one channel, drops the classifier and (ViTs) resamples position embeddings. Every other source in
    the pretrained config is blanked, so nothing is ever downloaded. A file that leaves backbone tensors
    unset (another architecture) is a ValueError naming the file, not a partial load. `norm="group"`: the
    BatchNorm layers become GroupNorm after loading (their affine parameters start fresh).
    """
    import timm
    from safetensors import SafetensorError
    from timm.models import load_state_dict

    from fedrad.common.norms import NORMS, to_group_norm

    path = os.fspath(path)
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}' (choose from {', '.join(NORMS)})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init checkpoint {path}: no such file")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"init checkpoint {path}: expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if os.path.getsize(path) > MAX_CHECKPOINT_BYTES:
        raise ValueError(f"init checkpoint {path}: larger than {MAX_CHECKPOINT_BYTES >> 30} GiB")
    try:
        state = load_state_dict(path, weights_only=True)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, EOFError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"init checkpoint {path}: not a readable state_dict ({first})") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"init checkpoint {path}: does not hold a state_dict of tensors")
    no_download = {"state_dict": dict(state), "file": None, "url": "", "hf_hub_id": None, "source": None}
    kwargs: dict = {"in_chans": 1, "num_classes": 0, "pretrained": True, "pretrained_cfg_overlay": no_download}
    if image_size is not None and _takes_img_size(name):
        kwargs["img_size"] = image_size
    try:
        backbone = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown model '{name}' (try one of {', '.join(KNOWN_MODELS)})") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"init checkpoint {path}: does not load into {name} ({first})") from None
    missing = [k for k in backbone.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"init checkpoint {path}: not a {name} checkpoint ({len(missing)} of "
                         f"{len(backbone.state_dict())} backbone tensors missing, e.g. '{missing[0]}')")
    return to_group_norm(backbone) if norm == "group" else backbone


class ContrastiveModel(nn.Module):
    """Backbone + the objective's heads (a projector; a predictor for simsiam/byol). Only the backbone is
    released. `forward(x)` returns the projection z; heads are attributes named as the objective declares
    them (`model.predictor(z)` gives p), so the state_dict names are `backbone.*`, `projector.*`, ...
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        if "backbone" in heads:
            raise ValueError("an objective's head cannot be called 'backbone'")
        self.head_names = tuple(heads)
        for name, module in heads.items():
            self.add_module(name, module)

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features (what downstream users get)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def build_model(model_name: str, objective: str, image_size: int, proj_dim: int = 128,
                norm: str = "batch") -> ContrastiveModel:
    """The model every site and the server build identically for a run (same names, same state_dict keys).

    The heads are the registered objective's (`Objective.heads`). `norm="group"`: GroupNorm in the backbone
    and the heads (RunConfig.model_norm, for dp = "sample").
    """
    from fedrad.common.losses import get_objective
    from fedrad.common.norms import to_group_norm

    spec = get_objective(objective)
    backbone = create_backbone(model_name, in_chans=1, image_size=image_size, norm=norm)
    model = ContrastiveModel(backbone, spec.heads(int(backbone.num_features), proj_dim))
    if norm == "group":
        to_group_norm(model)
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Everything federated averaging must carry: parameters and BN running statistics (full state_dict)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def save_backbone(backbone: nn.Module, path: str | os.PathLike, metadata: Mapping[str, object]) -> None:
    """Write the backbone's state_dict as safetensors, metadata in the header, through the one atomic writer."""
    from safetensors.torch import save_file

    from fedrad.common.atomic import atomic_write

    if isinstance(backbone, ContrastiveModel):
        backbone = backbone.backbone
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.setdefault("format", "pt")
    meta.setdefault("in_chans", "1")
    atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (model, image_size, objective, ...)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_backbone(model_name: str, path: str | os.PathLike, image_size: int | None = None) -> nn.Module:
    """Build `model_name` and load the weights strictly (a mismatch is an error, not a partial load).

    The file's metadata says whether it is the GroupNorm variant (`norm`) and, for ViTs, its input size.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if image_size is None and _takes_img_size(model_name):
        size = meta.get("image_size")
        image_size = int(size) if size else None
    backbone = create_backbone(model_name, in_chans=1, image_size=image_size, norm=meta.get("norm", "batch"))
    backbone.load_state_dict(load_file(os.fspath(path)), strict=True)
    return backbone


__all__ = [
    "KNOWN_MODELS",
    "TINY_MODEL",
    "ContrastiveModel",
    "build_model",
    "CHECKPOINT_SUFFIXES",
    "create_backbone",
    "load_backbone",
    "load_timm_checkpoint",
    "read_metadata",
    "save_backbone",
    "trainable_state",
]
