"""A fine-tuning site's commands: finetune, embed, export (of a verified release), and pretrain (the centralised
baseline). Typed functions with the command's options as keywords; `fedrad.deploy.cli` only parses arguments
into them and `import fedrad` calls them directly.

A bundle is never used unverified unless `insecure=True`: refusal raises errors.BundleRefused (exit 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrad.deploy.commands.errors import BadInput, BundleRefused
from fedrad.deploy.commands.site import release_policy

PathLike = str | os.PathLike[str]


def _bundle(bundle: PathLike | None, release: str | None, state_dir: PathLike | None) -> str:
    from fedrad.client.site.release_store import bundle_folder

    return bundle_folder(os.fspath(bundle) if bundle else None, release, os.fspath(state_dir) if state_dir else None)


def _out_folder(out: PathLike) -> Path:
    if Path(out).exists() and not Path(out).is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    return Path(out)


def _fractions(value: str | Sequence[float]) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    fr = sorted({float(x) for x in items if str(x).strip()})
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise BadInput(f"--fractions must be numbers in (0, 1], got {value!r}")
    return fr


def _load(command: str, source: str, pubkey: PathLike | None, insecure: bool, policy=None):
    from fedrad.client.tools.model_source import load_model_source
    from fedrad.common.bundle import BundleVerificationError

    try:
        return load_model_source(source, os.fspath(pubkey) if pubkey else None, insecure, policy)
    except BundleVerificationError as exc:
        raise BundleRefused(f"bundle verification FAILED: {exc}") from None


def finetune(bundle: PathLike | None = None, *, data: PathLike, release: str | None = None,
             state_dir: PathLike | None = None, pubkey: PathLike | None = None, insecure: bool = False,
             labels: PathLike | None = None, target: str | None = None, test_data: PathLike | None = None,
             test_labels: PathLike | None = None, mode: str = "linear", fractions: str | Sequence[float] = "0.1,1.0",
             seeds: int = 1, compare: PathLike | None = None, dp_epsilon: float | None = None,
             dp_delta: float = 1e-5, epochs: int = 20, device: str = "auto", out: PathLike = "finetune-results",
             expect_run: str | None = None, min_sequence: int | None = None, min_created: str | None = None
             ) -> Path:
    """`fedrad finetune`: verify, load the labelled set, split by patient, fit per fraction and seed, write the
    tables and the plot into `out` (returned)."""
    from fedrad.client.evaluation.data import load_data
    from fedrad.client.evaluation.metrics import N_BOOTSTRAP
    from fedrad.client.evaluation.splits import holdout_split
    from fedrad.client.tools.finetune.experiment import Arm, random_arm, run_experiment
    from fedrad.client.tools.finetune.report import write_outputs
    from fedrad.client.training.trainer import resolve_device

    if mode not in ("linear", "mlp", "full"):
        raise BadInput(f"--mode {mode!r}: give linear, mlp or full")
    chosen = _fractions(fractions)
    if seeds < 1 or epochs < 1:
        raise BadInput("--seeds and --epochs must be >= 1")
    dp = (float(dp_epsilon), float(dp_delta)) if dp_epsilon is not None else None
    if dp is not None and (dp[0] <= 0 or not 0 < dp[1] < 1):
        raise BadInput("--dp-epsilon must be > 0 and --dp-delta in (0, 1)")
    source = _bundle(bundle, release, state_dir)  # BUNDLE, or --release latest|ID from the site's store
    if not insecure and not pubkey:
        raise BadInput("pass --pubkey to verify the bundle (or --insecure to skip)")
    out = _out_folder(out)
    policy = release_policy(expect_run, min_sequence, min_created)  # BUNDLE only: --compare is a reference arm
    backbone, manifest = _load("finetune", source, pubkey, insecure, policy)
    arms = [Arm("pretrained", backbone, manifest.get("input_size"))]
    if compare:
        other, m2 = _load("finetune", os.fspath(compare), pubkey, insecure)
        arms.append(Arm(f"compare:{Path(compare).name}", other, m2.get("input_size")))
    if not insecure:
        print(f"fedrad finetune: bundle {source} verified", file=sys.stderr)
    size = int(manifest.get("input_size") or 64)
    arms.insert(1, random_arm(manifest["model"], manifest.get("input_size"), norm=manifest.get("norm", "batch")))
    targets = [t.strip() for t in target.split(",")] if target else None
    labelled = load_data(data, size, labels, targets)
    if test_data:  # REMEDIS's out-of-distribution setting: train here, test there
        from fedrad.client.tools.finetune.ood import combine_for_ood

        other_set = load_data(test_data, size, test_labels, targets)
        labelled, train_idx, test_idx, split_kind = combine_for_ood(labelled, other_set)
    else:
        train_idx, test_idx, split_kind = holdout_split(labelled)
    dev = str(resolve_device(device))
    print(f"fedrad finetune: {len(labelled)} images, targets {labelled.targets}, split {split_kind} "
          f"({len(train_idx)} train / {len(test_idx)} test), mode {mode} on {dev}", file=sys.stderr)
    rows = run_experiment(arms, labelled, train_idx, test_idx, chosen, mode, seeds, epochs, dp, dev,
                          log=lambda m: print(m, file=sys.stderr))
    meta = {"bundle": source, "verified": not insecure, "model": manifest.get("model"),
            "input_size": size, "data": str(data), "test_data": str(test_data) if test_data else None,
            "targets": labelled.targets, "split": split_kind, "mode": mode, "seeds": seeds, "epochs": epochs,
            "dp": f"epsilon={dp[0]}, delta={dp[1]}" if dp else "none",
            "ci": f"95% percentile bootstrap over test patients ({N_BOOTSTRAP} resamples)"}
    table = write_outputs(out, rows, meta, f"fine-tuning {manifest.get('model')} ({mode})")
    print(table)
    print(f"fedrad finetune: results in {out / 'results.md'}, plot {out / 'auc_vs_fraction.png'}")
    return out


def embed(bundle: PathLike | None = None, *, data: PathLike, release: str | None = None,
          state_dir: PathLike | None = None, pubkey: PathLike | None = None, insecure: bool = False,
          color_by: str | None = None, out: PathLike = "embeddings", expect_run: str | None = None,
          min_sequence: int | None = None, min_created: str | None = None) -> Path:
    """`fedrad embed`: verify (unless insecure), embed every usable image, write npy + index + t-SNE into `out`."""
    from fedrad.client.tools.embed import embed_folder

    source = _bundle(bundle, release, state_dir)
    if not insecure and not pubkey:
        raise BadInput("pass --pubkey to verify the bundle (or --insecure to skip)")
    out = _out_folder(out)
    backbone, manifest = _load("embed", source, pubkey, insecure,
                               release_policy(expect_run, min_sequence, min_created))
    return embed_folder(backbone, manifest, data, out, color_by)


def export(bundle: PathLike | None = None, *, format: str, pubkey: PathLike, out: PathLike,
           release: str | None = None, state_dir: PathLike | None = None, expect_run: str | None = None,
           min_sequence: int | None = None, min_created: str | None = None) -> Path:
    """`fedrad export`: a verified release as a MONAI bundle, an ONNX graph or TorchScript in `out`; returns the
    file written. Exports never skip verification (the usual rollback policy applies)."""
    from fedrad.client.tools.exporters import EXPORTERS, FORMATS, RELEASE_DIR, MissingExtra, require_extra
    from fedrad.common.bundle import WEIGHTS, BundleVerificationError, build_backbone, read_verified

    if format not in FORMATS:
        raise BadInput(f"--format {format!r}: give one of {', '.join(FORMATS)}")
    try:
        require_extra(format)
    except MissingExtra as exc:
        raise BadInput(str(exc)) from None
    out = _out_folder(out)
    source = Path(_bundle(bundle, release, state_dir))  # BUNDLE, or --release latest|ID from the site's store
    try:
        verified = read_verified(source, Path(pubkey), release_policy(expect_run, min_sequence, min_created))
        backbone = build_backbone(verified.manifest, verified.state_dict(), source, source / WEIGHTS)
    except BundleVerificationError as exc:
        raise BundleRefused(f"bundle verification FAILED: {exc}") from None
    if not verified.manifest.get("input_size"):
        raise BadInput(f"{source}: the manifest records no input size, so there is no input shape to export")
    out.mkdir(parents=True, exist_ok=True)
    result = EXPORTERS[format](verified, backbone, out)
    if format == "monai-bundle":
        read_verified(out / RELEASE_DIR, Path(pubkey))  # the copy a later `finetune`/`embed` verifies
    m = verified.manifest
    line = f"fedrad export: {source} verified; {m['model']} as {format} -> {result['file']}"
    if "max_abs_diff" in result:
        line += f" (onnxruntime vs PyTorch max abs diff {result['max_abs_diff']:.2e})"
    print(line)
    return Path(result["file"])


def pretrain(data: PathLike, *, steps: int = 100, rounds: int = 1, device: str = "auto",
             cache: PathLike | None = None, out: PathLike = "pretrained.safetensors", **recipe: Any) -> Path:
    """`fedrad pretrain`: centralised self-supervised pretraining on one folder; returns the weights file.

    `recipe`: any field of fedrad.common.recipe.Recipe (objective, model, batch_size, image_size, lr, aug_*, ...),
    with the defaults of a federated run; a bad value is a ValueError naming it (exit 2)."""
    from fedrad.client.training.pretrain import pretrain_folder
    from fedrad.common.bundle import BundleVerificationError
    from fedrad.common.recipe import Recipe

    known = {f.name for f in Recipe.recipe_fields()}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise BadInput(f"unknown recipe option(s): {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    chosen = Recipe(**recipe)  # a bad value: one line naming the option, exit 2
    try:
        return pretrain_folder(data, chosen, steps, rounds, device, cache, out)
    except BundleVerificationError as exc:
        raise BundleRefused(f"--init bundle verification FAILED: {exc}") from None


__all__ = ["embed", "export", "finetune", "pretrain"]
