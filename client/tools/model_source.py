"""What `fedrad finetune` and `fedrad embed` load: a release folder, a MONAI bundle export, or `local-dir:PATH`.

All three are verified with the consortium key unless `--insecure`:

* a release folder: common.bundle.load_verified_backbone, as always;
* `local-dir:PATH` (timm's name for a folder with config.json): a release folder verified as above, then built
  by timm's own local-dir loader from the verified config.json and weights bytes (so what runs is what plain
  timm gives a site); with `--insecure`, any timm local-dir folder;
* a MONAI bundle written by `fedrad export --format monai-bundle`: its signed `fedrad-release/` copy is
  verified and the backbone built from it, and `models/model.pt` (what MONAI tools load) must hold exactly the
  signed tensors; with `--insecure`, models/model.pt with the architecture in configs/metadata.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrad.common.bundle import (
    MANIFEST,
    MAX_WEIGHTS_BYTES,
    WEIGHTS,
    BundleVerificationError,
    ReleasePolicy,
    build_backbone,
    load_verified_backbone,
    read_verified,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

TIMM_PREFIX = "local-dir:"
MONAI_METADATA = Path("configs") / "metadata.json"
MONAI_WEIGHTS = Path("models") / "model.pt"
RELEASE_DIR = "fedrad-release"  # as client.tools.exporters writes it


def load_model_source(source: str | os.PathLike[str], pubkey, insecure: bool = False,
                      policy: ReleasePolicy | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone in eval mode, manifest-like dict with model, in_chans, input_size, norm) for any of the three
    sources in the module docstring. Raises BundleVerificationError (refused, exit 1) or ValueError/
    FileNotFoundError (bad input, exit 2)."""
    text = os.fspath(source)
    timm_dir = text.startswith(TIMM_PREFIX)
    path = Path(text[len(TIMM_PREFIX):] if timm_dir else text)
    if (path / MONAI_METADATA).is_file():
        return _monai_bundle(path, pubkey, insecure, policy)
    if not timm_dir:
        return load_verified_backbone(path, pubkey, insecure, policy)
    if insecure and not (path / MANIFEST).is_file():
        return _plain_timm(path)
    if insecure:
        return load_verified_backbone(path, pubkey, insecure, policy)
    if not pubkey:
        raise ValueError("no public key given: pass --pubkey (or --insecure to skip the check)")
    verified = read_verified(path, pubkey, policy)
    if verified.config is None:
        reason = (verified.manifest.get("config") or {}).get("reason") or "the release predates timm configs"
        raise ValueError(f"{text}: this release has no timm config.json ({reason}); pass the folder without "
                         f"'{TIMM_PREFIX}'")
    from fedrad.common.timm_config import create_from_bytes

    return create_from_bytes(verified.config, verified.weights), verified.manifest


def _plain_timm(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Any timm local-dir folder, unverified (--insecure): timm reads config.json and the weights."""
    import timm

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{TIMM_PREFIX}{path}: no config.json (not a timm local-dir folder)")
    try:
        model = timm.create_model(f"{TIMM_PREFIX}{path}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{TIMM_PREFIX}{path}: timm cannot load it ({first})") from None
    cfg = model.pretrained_cfg
    size = tuple(cfg.get("input_size") or (1, 0, 0))
    return model.eval(), {"model": cfg.get("architecture"), "in_chans": int(size[0]), "input_size": int(size[-1]),
                          "norm": "batch", "source": f"{TIMM_PREFIX}{path}"}


def _read_model_pt(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise error(f"missing file: {path}")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise error(f"{path}: larger than {MAX_WEIGHTS_BYTES >> 30} GiB")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a bad file; all mean "not a state_dict"
        raise error(f"{path}: not a readable state_dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{path}: does not hold a state_dict of tensors")
    return state


def _monai_bundle(path: Path, pubkey, insecure: bool, policy: ReleasePolicy | None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    import torch

    if insecure:
        import json
        import sys

        print(f"fedrad: WARNING: using {path} WITHOUT signature verification (--insecure)", file=sys.stderr)
        try:
            meta = json.loads((path / MONAI_METADATA).read_text(encoding="utf-8"))
            info = meta["fedrad"]
            image = meta["network_data_format"]["inputs"]["image"]
            manifest = {"model": info["model"], "norm": info.get("norm", "batch"),
                        "in_chans": int(image["num_channels"]), "input_size": int(image["spatial_shape"][0])}
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            raise ValueError(f"{path / MONAI_METADATA}: not the metadata of a fedrad MONAI bundle export") from None
        state = _read_model_pt(path / MONAI_WEIGHTS, ValueError)
        return build_backbone(manifest, state, path, path / MONAI_WEIGHTS, ValueError), manifest
    if not pubkey:
        raise ValueError("no public key given: pass --pubkey (or --insecure to skip the check)")
    release = path / RELEASE_DIR
    verified = read_verified(release, pubkey, policy)
    signed = verified.state_dict()
    backbone = build_backbone(verified.manifest, signed, release, release / WEIGHTS)
    exported = _read_model_pt(path / MONAI_WEIGHTS, BundleVerificationError)
    if exported.keys() != signed.keys() or any(not torch.equal(exported[k], signed[k]) for k in signed):
        raise BundleVerificationError(f"{path / MONAI_WEIGHTS}: not the weights of the signed release in {release} "
                                      f"(modified after export)")
    return backbone, verified.manifest


__all__ = ["MONAI_METADATA", "MONAI_WEIGHTS", "TIMM_PREFIX", "load_model_source"]
