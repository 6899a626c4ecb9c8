"""A verified release in the formats hospital inference stacks take: a MONAI bundle, ONNX, TorchScript.

Every exporter starts from a `VerifiedBundle` (common.bundle.read_verified) and the backbone built from its
verified bytes; nothing here reads the release's files again. ONNX is checked against PyTorch with
onnxruntime on random inputs (max abs difference returned, refused above `ONNX_TOLERANCE`). The MONAI bundle
carries the signed release beside it (`fedrad-release/`), so `fedrad finetune/embed` can verify an export
later; its `configs/inference.json` rebuilds the network with timm from the release's config.json arguments
(or loads the TorchScript module when timm cannot rebuild it, see common.timm_config).

monai, onnx and onnxruntime are the optional extra `fedrad[export]`: `require_extra` says how to install it.
"""

from __future__ import annotations

import io
import json
import warnings
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrad.client.tools.model_source import RELEASE_DIR
from fedrad.common.atomic import atomic_write, atomic_write_bytes
from fedrad.common.bundle import CARD, CONFIG, MANIFEST, SIGNATURE, WEIGHTS, VerifiedBundle

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("monai-bundle", "onnx", "torchscript")
EXTRA = {"monai-bundle": ("monai",), "onnx": ("onnx", "onnxruntime"), "torchscript": ()}
INSTALL = "pip install 'fedrad[export]'"
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17
MONAI_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                "meta_schema_20240725.json")


class MissingExtra(Exception):
    """An optional package of `fedrad[export]` is not installed (exit 2, one line naming the pip command)."""


def require_extra(fmt: str) -> None:
    """MissingExtra naming the pip command when a package `fmt` needs cannot be imported."""
    for name in EXTRA[fmt]:
        try:
            import_module(name)
        except ImportError:
            raise MissingExtra(f"--format {fmt} needs the '{name}' package: {INSTALL}") from None


def _example(manifest: dict[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    import torch

    size = int(manifest["input_size"])
    return torch.rand(batch, int(manifest["in_chans"]), size, size, generator=torch.Generator().manual_seed(seed))


def _trace(backbone: nn.Module, manifest: dict[str, Any]) -> torch.jit.ScriptModule:
    """TorchScript by tracing (timm's models trace cleanly; torch marks torch.jit deprecated, which is no news
    to a site that asked for TorchScript, so that warning is not repeated)."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return torch.jit.trace(backbone.eval(), _example(manifest, 1))


def _script_bytes(module: torch.jit.ScriptModule) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        torch.jit.save(module, buf)
    return buf.getvalue()


def export_torchscript(verified: VerifiedBundle, backbone: nn.Module, out: Path) -> dict[str, Any]:
    """OUT/model.ts: the traced backbone (input N x C x S x S in [0, 1]; output N x num_features)."""
    path = atomic_write_bytes(out / "model.ts", _script_bytes(_trace(backbone, verified.manifest)), mode=0o644)
    return {"file": str(path)}


def export_onnx(verified: VerifiedBundle, backbone: nn.Module, out: Path) -> dict[str, Any]:
    """OUT/model.onnx (input `image` N x C x S x S, output `features`, dynamic batch), checked by onnx's checker
    and against PyTorch with onnxruntime; ValueError when the difference exceeds ONNX_TOLERANCE."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    manifest = verified.manifest
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # torch's TorchScript-based exporter (dynamo=False) needs no onnxscript; its deprecation note is dropped
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(legacy|deprecated|will be removed).*")
        torch.onnx.export(backbone.eval(), (_example(manifest, 1),), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _example(manifest, 4, seed=1)
    with torch.no_grad():
        want = backbone(x).numpy()
    got = session.run(["features"], {"image": x.numpy()})[0]
    diff = float(np.max(np.abs(got - want)))
    if not diff <= ONNX_TOLERANCE:
        raise ValueError(f"ONNX export of {manifest['model']}: max abs difference {diff:.3g} to PyTorch is over "
                         f"{ONNX_TOLERANCE:g}; not written")
    path = atomic_write_bytes(out / "model.onnx", data, mode=0o644)
    return {"file": str(path), "max_abs_diff": diff, "opset": ONNX_OPSET}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _network_def(verified: VerifiedBundle) -> dict[str, Any] | str:
    """inference.json's network: timm.create_model with the release config's arguments, else the TorchScript."""
    if verified.config is None:
        return "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')"
    config = json.loads(verified.config)
    return {"_target_": "timm.create_model", "model_name": config["architecture"], "pretrained": False,
            **config.get("model_args", {})}


def monai_configs(verified: VerifiedBundle, num_features: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata.json, inference.json) of the MONAI bundle for this release."""
    import monai
    import numpy
    import torch

    m = verified.manifest
    size, chans = int(m["input_size"]), int(m["in_chans"])
    rel = m.get("release") or {}
    privacy = m.get("privacy") or {}
    metadata = {
        "schema": MONAI_SCHEMA,
        "version": f"{rel.get('sequence', 1)}.0.0",
        "changelog": {f"{rel.get('sequence', 1)}.0.0": f"fedrad run {rel.get('run_id')} release "
                                                        f"#{rel.get('sequence')}, signed {m['created']}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"timm": _version("timm")},
        "name": f"fedrad {m['model']} radiograph backbone",
        "task": "Feature extraction (embeddings) from grayscale radiographs",
        "description": f"{m['model']} backbone pretrained with federated {m.get('objective')} learning across "
                       f"{m.get('sites')} sites (fedrad); outputs {num_features} features per image. See "
                       f"docs/README.md (the release's model card).",
        "authors": "the fedrad consortium that signed this release",
        "copyright": "the fedrad consortium",
        "license": m.get("license", "see LICENSE"),
        "data_source": "images held at the consortium's sites; they never left the sites",
        "data_type": "dicom or png (grayscale radiographs)",
        "image_classes": f"{chans} channel grayscale intensity in [0, 1], zero-padded square {size} x {size}",
        "pred_classes": f"{num_features} unnormalised features (no classifier head)",
        "intended_use": "Research: frozen features or fine-tuning on a site's own labelled, validated task. "
                        "Not a medical device; no diagnosis.",
        "references": [],
        "privacy": {k: privacy.get(k) for k in ("differential_privacy", "epsilon", "delta", "unit")},
        "fedrad": {"model": m["model"], "norm": m["norm"], "run_id": rel.get("run_id"),
                   "sequence": rel.get("sequence"), "weights_sha256": m["weights"]["sha256"],
                   "signed_release": RELEASE_DIR},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "xray", "num_channels": chans,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "tensor", "format": "features", "num_channels": num_features,
                                 "spatial_shape": [], "dtype": "float32", "value_range": [],
                                 "is_patch_data": False, "channel_def": {}}},
        },
    }
    inference = {
        "imports": ["$import torch", "$import timm"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "network_def": _network_def(verified),
        "network": "$@network_def.to(@device)",
        # fedrad's reading of a DICOM image: intensity to [0, 1] between the 0.5/99.5 percentiles, the longer
        # side resized to the input size (bilinear, antialiased), zero-padded to a centred square. MONAI's 2-D
        # readers give (width, height); the Transposed gives the (rows, columns) order the backbone learned.
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
            {"_target_": "Transposed", "keys": "image", "indices": [0, 2, 1]},
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 0.5, "upper": 99.5,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "Resized", "keys": "image", "spatial_size": size, "size_mode": "longest",
             "mode": "bilinear", "anti_aliasing": True},
            {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [size, size], "mode": "constant"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]},
        "inferer": {"_target_": "SimpleInferer"},
        "initialize": ["$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
                       "$@network.eval()"],
    }
    return metadata, inference


def export_monai_bundle(verified: VerifiedBundle, backbone: nn.Module, out: Path) -> dict[str, Any]:
    """A MONAI bundle in OUT: configs/metadata.json, configs/inference.json, models/model.pt (the state_dict),
    models/model.ts (TorchScript), LICENSE, docs/README.md (the model card) and fedrad-release/ (the signed
    release, so fedrad can verify the export), each file written atomically."""
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    metadata, inference = monai_configs(verified, int(backbone.num_features))
    for sub in ("configs", "models", "docs", RELEASE_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write(out / "models" / "model.pt", lambda p: torch.save(state, p))
    atomic_write_bytes(out / "models" / "model.ts", _script_bytes(_trace(backbone, verified.manifest)), mode=0o644)
    for name, obj in (("metadata.json", metadata), ("inference.json", inference)):
        atomic_write_bytes(out / "configs" / name, (json.dumps(obj, indent=2) + "\n").encode("utf-8"), mode=0o644)
    card = verified.card or b"(this release has no model card)\n"
    atomic_write_bytes(out / "docs" / "README.md", card, mode=0o644)
    atomic_write_bytes(out / "LICENSE", (f"The weights in this bundle are released under "
                                         f"{verified.manifest.get('license', 'the licence the consortium stated')} "
                                         f"(see docs/README.md).\n").encode(), mode=0o644)
    release = {WEIGHTS: verified.weights, CARD: verified.card, CONFIG: verified.config,
               MANIFEST: (verified.path / MANIFEST).read_bytes(),
               SIGNATURE: (verified.path / SIGNATURE).read_bytes()}
    for name, data in release.items():
        if data is not None:
            atomic_write_bytes(out / RELEASE_DIR / name, data, mode=0o644)
    return {"file": str(out / "configs" / "metadata.json")}


EXPORTERS = {"monai-bundle": export_monai_bundle, "onnx": export_onnx, "torchscript": export_torchscript}

__all__ = ["EXPORTERS", "FORMATS", "INSTALL", "MissingExtra", "ONNX_TOLERANCE", "RELEASE_DIR", "export_monai_bundle",
           "export_onnx", "export_torchscript", "monai_configs", "require_extra"]
