"""fedrad's public Python API: the few calls a site's own scripts need, without the command line.

Everything here is lazy: `import fedrad` imports neither torch nor Flower; each call imports what it uses.
`pretrain`, `finetune` and `embed` run the same code as the `fedrad` commands of the same name (their keyword
options are the command's long options, `image_size=64` for `--image-size 64`), so the API and the CLI
cannot drift apart; a failed command raises `FedradError` carrying its exit code.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # a source folder on sys.path without an install
    __version__ = "0+unknown"

__all__ = ["FedradError", "__version__", "embed", "finetune", "load_backbone", "pretrain", "verify_bundle"]

PathLike = str | os.PathLike[str]


class FedradError(RuntimeError):
    """A fedrad command called through the API failed; `exit_code` is the CLI's (2: bad input, 1: refused)."""

    def __init__(self, command: str, exit_code: int) -> None:
        super().__init__(f"fedrad {command} failed with exit code {exit_code} (its reason is on stderr)")
        self.exit_code = exit_code


def _argv(options: dict[str, Any]) -> list[str]:
    """Keyword options -> CLI options: True -> a flag, False/None -> left out, anything else -> its str()."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def _run(command: str, positional: list[PathLike], options: dict[str, Any]) -> None:
    from fedrad.deploy.cli import main

    code = main([command, *map(str, positional), *_argv(options)])
    if code:
        raise FedradError(command, code)


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
    _run("pretrain", [data], {**options, "out": out})
    return Path(out)


def finetune(bundle: PathLike, data: PathLike, out: PathLike = "finetune-results", **options: Any) -> Path:
    """Label-efficiency fine-tuning of a bundle on a labelled set (`fedrad finetune`); returns the results folder.

    Options as the command's: pubkey (verify first; required unless insecure=True), labels, target, mode,
    fractions, seeds, compare, dp_epsilon, dp_delta, epochs, device, and the release-policy checks.
    """
    _run("finetune", [bundle], {**options, "data": data, "out": out})
    return Path(out)


def embed(bundle: PathLike, data: PathLike, out: PathLike = "embeddings", **options: Any) -> Path:
    """Embeddings (npy + CSV) and a t-SNE plot of a folder (`fedrad embed`); returns the output folder.

    Options as the command's: pubkey (required unless insecure=True), color_by, and the release-policy checks.
    """
    _run("embed", [bundle], {**options, "data": data, "out": out})
    return Path(out)
