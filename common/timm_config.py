"""A release's timm `config.json`: how plain timm rebuilds the exact backbone and feeds it as fedrad did.

`timm.create_model("local-dir:BUNDLE", pretrained=True)` reads BUNDLE/config.json (architecture, model_args)
and the folder's one .safetensors file; `timm.data.resolve_data_config(model=...)` then reads the
preprocessing from the same file. timm writes the file itself (`save_config_for_hf`); fedrad only supplies the
preprocessing its sites used (`data_config`) and, for the GroupNorm variant (dp = "sample"), the `norm_layer`
that rebuilds it, after checking that timm's rebuild computes exactly what fedrad's backbone computes. When no
timm argument rebuilds it (GroupNorm over channel counts that are not multiples of 32: timm's GroupNorm has 32
groups, fedrad's gcd(32, C)), there is no config.json and the manifest says why.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedrad.common.bundle import CONFIG

if TYPE_CHECKING:
    import torch
    from torch import nn

# The ways timm's own factory arguments can express fedrad's norm variants, tried in order.
_NORM_ARGS: dict[str, tuple[dict[str, str], ...]] = {"batch": ({},), "group": ({}, {"norm_layer": "groupnorm"})}


def data_config(in_chans: int, size: int) -> dict[str, Any]:
    """The preprocessing fedrad's sites apply (common.image_ops.fit_square, common.dicom_io), in timm's terms.

    Images are grayscale in [0, 1] with no mean/std normalisation; the longer side is resized to `size` with
    bilinear (antialiased) interpolation and the square is zero-padded: timm's `crop_mode="border"` with
    `crop_pct=1.0` and a fill of 255 x mean = 0.
    """
    return {"input_size": (in_chans, size, size), "interpolation": "bilinear", "mean": (0.0,) * in_chans,
            "std": (1.0,) * in_chans, "crop_pct": 1.0, "crop_mode": "border"}


def _timm_model(name: str, in_chans: int, size: int | None, extra: Mapping[str, str]) -> nn.Module:
    import timm

    from fedrad.common.models import _takes_img_size

    kwargs: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0, **extra}
    if size is not None and _takes_img_size(name):
        kwargs["img_size"] = size
    return timm.create_model(name, pretrained=False, **kwargs)


def _same_function(reference: nn.Module, candidate: nn.Module, state: Mapping[str, torch.Tensor],
                   in_chans: int, size: int) -> bool:
    """The candidate loads the released tensors strictly and gives the reference's outputs exactly."""
    import torch

    try:
        candidate.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError):
        return False
    x = torch.rand(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    reference.eval()
    candidate.eval()
    with torch.no_grad():
        return bool(torch.equal(reference(x), candidate(x)))


def rebuild_args(name: str, in_chans: int, size: int, norm: str, state: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, str] | None, str | None]:
    """(extra timm model_args that rebuild the released backbone exactly, None) or (None, why none does)."""
    from fedrad.common.models import create_backbone

    reference = create_backbone(name, in_chans=in_chans, image_size=size, norm=norm)
    reference.load_state_dict(state, strict=True)
    for extra in _NORM_ARGS.get(norm, ()):
        try:
            candidate = _timm_model(name, in_chans, size, extra)
        except (TypeError, ValueError, RuntimeError, AssertionError):
            continue  # the architecture does not take the argument, or its channels do not divide
        if _same_function(reference, candidate, state, in_chans, size):
            return dict(extra), None
    if norm == "group":
        return None, (f"{name} with GroupNorm (dp = 'sample') uses gcd(32, channels) groups per layer; timm's "
                      f"norm_layer='groupnorm' has 32, which does not fit this architecture's channel counts. "
                      f"Load it with fedrad.load_backbone (or an ONNX/TorchScript export)")
    return None, f"timm's {name} does not rebuild the released backbone exactly"


def config_bytes(name: str, in_chans: int, size: int, norm: str, state: Mapping[str, torch.Tensor],
                 tag: str, license_id: str) -> tuple[bytes | None, str | None]:
    """(config.json bytes, None), written by timm for the released backbone, or (None, why there is none)."""
    extra, reason = rebuild_args(name, in_chans, size, norm, state)
    if extra is None:
        return None, reason
    from timm.models._hub import save_config_for_hf

    model = _timm_model(name, in_chans, size, extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFIG)
        save_config_for_hf(model, path, model_args=extra or None, data_config=data_config(in_chans, size))
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    cfg = config["pretrained_cfg"]
    for key in ("origin_url", "paper_ids", "hf_hub_id", "url", "notes"):  # they describe timm's ImageNet weights
        cfg.pop(key, None)
    cfg.update(tag=tag, license=license_id)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"), None


def parse_config(data: bytes, where: str) -> dict[str, Any]:
    """A config.json's object (architecture, model_args, pretrained_cfg); ValueError naming `where`."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{where}: not valid UTF-8 JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("architecture"), str) \
            or not isinstance(obj.get("pretrained_cfg", {}), dict) or not isinstance(obj.get("model_args", {}), dict):
        raise ValueError(f"{where}: not a timm config (needs 'architecture', 'model_args', 'pretrained_cfg')")
    return obj


def create_from_bytes(config: bytes, weights: bytes) -> nn.Module:
    """timm's own local-dir loading of these exact (already verified) bytes: written to a private temporary
    folder, so nothing on the bundle's disk can change between checking and loading."""
    import timm

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, CONFIG), "wb") as f:
            f.write(config)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(weights)
        model = timm.create_model(f"local-dir:{tmp}", pretrained=True)
    return model.eval()


__all__ = ["CONFIG", "config_bytes", "create_from_bytes", "data_config", "parse_config", "rebuild_args"]
