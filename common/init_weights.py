"""Where a run's first model comes from: random, a local timm checkpoint, or an earlier fedrad release.

REMEDIS starts from ImageNet weights; a consortium that grows continues from its last release. `init` (run
config, `fedrad pretrain --init`) names either a checkpoint FILE on the machine that builds the first model
(the coordinator, or the site running `fedrad pretrain`) or a release bundle FOLDER, which is verified with
`init-pubkey` (the consortium's public key) before a byte of it is used. Nothing is downloaded. Only the
backbone is initialised; the objective's heads start random (seeded), since a release carries no heads.

What was loaded is recorded (`InitRecord.to_json`): the checkpoint's sha256, or the release's run id,
sequence and weights sha256, so run.json and the released manifest say what the run started from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fedrad.common.models import ContrastiveModel

KIND_CHECKPOINT = "timm-checkpoint"
KIND_RELEASE = "fedrad-release"


@dataclass(frozen=True)
class InitRecord:
    """What a model was initialised from (written to run.json and the release manifest as `init`)."""

    kind: str
    path: str
    sha256: str  # of the checkpoint file, or of the release's verified weights file
    release: dict[str, Any] | None = None  # run_id, run_key, sequence, created (releases only)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path, "sha256": self.sha256}
        if self.release is not None:
            out["release"] = self.release
        return out


def init_kind(init: str | os.PathLike[str], pubkey: str | os.PathLike[str] | None) -> str:
    """Which kind of source `init` is, checked cheaply before any work (FileNotFoundError/ValueError name it)."""
    from fedrad.common.models import CHECKPOINT_SUFFIXES

    path = Path(init).expanduser()
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ValueError(f"init {path}: a folder, but not a fedrad release bundle (no manifest.json)")
        if not pubkey:
            raise ValueError(f"init {path} is a release bundle: give init-pubkey (the consortium's public key) "
                             "to verify it")
        if not Path(pubkey).expanduser().is_file():
            raise FileNotFoundError(f"init-pubkey {pubkey}: no such file")
        return KIND_RELEASE
    if not path.exists():
        raise FileNotFoundError(f"init {path}: no such file or folder")
    if not path.is_file() or not path.name.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"init {path}: expected a timm checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a "
                         "release bundle folder")
    return KIND_CHECKPOINT


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Streaming sha256 (memory bounded whatever the checkpoint's size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def init_backbone(init: str | os.PathLike[str], pubkey: str | os.PathLike[str] | None, model: str,
                  image_size: int | None, norm: str = "batch") -> tuple[nn.Module, InitRecord]:
    """(grayscale `model` backbone with the init's weights, record). A release must name the same model and
    norm as the run; BundleVerificationError when it does not verify."""
    kind = init_kind(init, pubkey)
    path = Path(init).expanduser().resolve()
    if kind == KIND_CHECKPOINT:
        from fedrad.common.models import load_timm_checkpoint

        before = file_sha256(path)
        backbone = load_timm_checkpoint(model, path, image_size, norm)
        if file_sha256(path) != before:  # the record must name the bytes that were loaded
            raise ValueError(f"init {path}: the file changed while it was being loaded")
        return backbone, InitRecord(kind, str(path), before)

    from fedrad.common.bundle import load_verified_backbone

    backbone, manifest = load_verified_backbone(path, Path(pubkey).expanduser())
    if manifest.get("model") != model:
        raise ValueError(f"init {path}: the release is a {manifest.get('model')} backbone, the run builds {model}")
    if str(manifest.get("norm", "batch")) != norm:
        raise ValueError(f"init {path}: the release uses {manifest.get('norm')} norm, the run needs {norm}")
    release = dict(manifest.get("release") or {})
    release["created"] = manifest.get("created")
    return backbone, InitRecord(kind, str(path), str(manifest["weights"]["sha256"]), release)


def apply_init(model: ContrastiveModel, init: str | os.PathLike[str], pubkey: str | os.PathLike[str] | None,
               model_name: str, image_size: int | None, norm: str = "batch") -> InitRecord:
    """Load the init's backbone into `model.backbone` strictly (the heads keep their own initialisation)."""
    backbone, record = init_backbone(init, pubkey, model_name, image_size, norm)
    try:
        model.backbone.load_state_dict(backbone.state_dict(), strict=True)
    except RuntimeError as exc:  # e.g. a ViT release made at another input size
        first = (str(exc).strip().splitlines() or ["mismatch"])[0][:200]
        raise ValueError(f"init {record.path}: does not fit this run's {model_name} ({first})") from None
    return record


__all__ = ["KIND_CHECKPOINT", "KIND_RELEASE", "InitRecord", "apply_init", "file_sha256", "init_backbone", "init_kind"]
