"""fedrad's public Python API: the few calls a site's own scripts need, without the command line.

Everything here is lazy: `import fedrad` imports neither torch nor Flower; each call imports what it uses.
`pretrain`, `finetune` and `embed` are the very functions the `fedrad` commands of the same name call
(fedrad.deploy.commands; keyword options are the command's long options, `image_size=64` for `--image-size
64`), so the API and the CLI cannot drift apart. They raise `BadInput` (a ValueError; the CLI's exit 2),
`BundleRefused` / `Refused` (exit 1), all `FedradError`s carrying `exit_code`.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedrad.deploy.commands.errors import BadInput, BundleRefused, FedradError, Refused

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # a source folder on sys.path without an install
    __version__ = "0+unknown"

__all__ = ["BadInput", "BundleRefused", "FedradError", "Refused", "__version__", "embed", "finetune", "load_backbone",
           "pretrain", "verify_bundle"]

PathLike = str | os.PathLike[str]


def verify_bundle(bundle: PathLike, pubkey: PathLike) -> dict[str, Any]:
    """The bundle's manifest once its signature and weights hash check out against the consortium key.

    Raises `fedrad.common.bundle.BundleVerificationError` for a bundle that must not be used.
    """
    from fedrad.common.bundle import verify_bundle as _verify

    return _verify(Path(bundle), Path(pubkey))


def load_backbone(bundle: PathLike, pubkey: PathLike):
    """(backbone `torch.nn.Module` in eval mode, manifest) from a verified bundle: the weights that are loaded
    are the very bytes whose hash the signed manifest names."""
    from fedrad.common.bundle import load_verified_backbone

    return load_verified_backbone(Path(bundle), Path(pubkey))


def pretrain(data: PathLike, out: PathLike = "pretrained.safetensors", **options: Any) -> Path:
    """Centralised self-supervised pretraining on one folder (`fedrad pretrain`); returns the weights file.

    Options as the command's: steps, rounds, device, cache, and every recipe switch with the defaults of a
    federated run (objective, model, batch_size, image_size, lr, aug_*, ...: fedrad.common.recipe.Recipe).
    """
    from fedrad.deploy.commands.finetune import pretrain as run

    return run(data, out=out, **options)


def finetune(bundle: PathLike, data: PathLike, out: PathLike = "finetune-results", **options: Any) -> Path:
    """Label-efficiency fine-tuning of a bundle on a labelled set (`fedrad finetune`); returns the results folder.

    Options as the command's: pubkey (verify first; required unless insecure=True), labels, target, mode,
    fractions, seeds, compare, dp_epsilon, dp_delta, epochs, device, and the release-policy checks.
    """
    from fedrad.deploy.commands.finetune import finetune as run

    return run(bundle, data=data, out=out, **options)


def embed(bundle: PathLike, data: PathLike, out: PathLike = "embeddings", **options: Any) -> Path:
    """Embeddings (npy + CSV) and a t-SNE plot of a folder (`fedrad embed`); returns the output folder.

    Options as the command's: pubkey (required unless insecure=True), color_by, and the release-policy checks.
    """
    from fedrad.deploy.commands.finetune import embed as run

    return run(bundle, data=data, out=out, **options)
