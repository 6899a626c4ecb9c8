"""`fedrad pretrain`: centralised contrastive pretraining on one folder, the baseline federated runs beat.

Same model, loop and file format as a federated run, so the two are directly comparable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def check_out_file(out: str | os.PathLike[str]) -> Path:
    """`--out` must be a file we can write, checked before training so a finished run is never lost to it."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {path}: is a folder; give a file name such as {path / 'pretrained.safetensors'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest folder that exists: save_backbone creates the rest
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: cannot write in {parent}")
    return path


def _apply_init(model, recipe):
    """`--init`: the backbone from a local timm checkpoint or a verified release (InitRecord); None without
    --init. A refused bundle raises BundleVerificationError (the command exits 1, as `fedrad verify` does)."""
    if not recipe.init:
        return None
    from fedrad.common.init_weights import apply_init

    record = apply_init(model, recipe.init, recipe.init_pubkey or None, recipe.model, recipe.image_size, recipe.norm)
    print(f"  init: {record.kind} {record.path} (sha256 {record.sha256[:16]}...)", file=sys.stderr)
    return record


def train_rounds(model, data, recipe, steps: int, rounds: int, device: str):
    """`steps` optimiser steps split into `rounds` rounds, each at its round's rate under the recipe's schedule
    with a fresh optimiser (as a federated site trains its rounds); one round is one plain run at `lr`."""
    from fedrad.client.training.trainer import TrainConfig, TrainResult, train_local

    done = TrainResult(losses=[], steps=0, examples=0, seconds=0.0)
    for rnd in range(1, rounds + 1):
        n = steps // rounds + (1 if rnd <= steps % rounds else 0)
        cfg = TrainConfig.from_recipe(recipe, n, device, recipe.recipe_lr(rnd, rounds),
                                      seed=recipe.seed + (rnd - 1) * 7919)
        result = train_local(model, data, cfg, progress=True)
        done = TrainResult(losses=done.losses + result.losses, steps=done.steps + result.steps,
                           examples=done.examples + result.examples, seconds=done.seconds + result.seconds)
    return done


def pretrain_folder(data_dir: str | os.PathLike[str], recipe, steps: int, rounds: int, device: str = "auto",
                    cache: str | os.PathLike[str] | None = None,
                    out: str | os.PathLike[str] = "pretrained.safetensors") -> Path:
    """Load the site, train `steps` steps of `recipe` (a fedrad.common.recipe.Recipe) in `rounds` rounds, evaluate
    on the held-out patients, write the backbone to `out` and return its path."""
    import torch

    from fedrad.client.site.site_data import load_site
    from fedrad.client.training.trainer import TrainConfig, evaluate_local, resolve_device
    from fedrad.common.losses import REGISTRY
    from fedrad.common.models import build_model, save_backbone

    if steps < 1 or not 1 <= rounds <= steps:
        raise ValueError("need --steps >= 1 and 1 <= --rounds <= --steps")
    if recipe.warmup_rounds >= rounds and recipe.warmup_rounds:
        raise ValueError("--warmup-rounds must be below --rounds")
    check_out_file(out)
    if recipe.init:
        from fedrad.common.init_weights import init_kind

        init_kind(recipe.init, recipe.init_pubkey or None)  # a bad path: one line before the data is loaded
    device = resolve_device(device)
    print(f"fedrad pretrain: loading {data_dir} at {recipe.image_size} px", file=sys.stderr)
    data = load_site(data_dir, recipe.image_size, cache_dir=cache, progress=True)
    skipped = sum((getattr(data, "skipped", None) or {}).values())
    print(f"  {len(data)} images usable, {skipped} skipped", file=sys.stderr)
    if len(data) < 2:
        raise ValueError(f"{data_dir}: {len(data)} usable image(s); contrastive training needs at least 2")

    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, recipe.objective, recipe.image_size, proj_dim=recipe.proj_dim,
                        norm=recipe.norm)
    init_record = _apply_init(model, recipe)
    cfg = TrainConfig.from_recipe(recipe, steps, str(device))
    n_params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    print(f"  {recipe.model} ({n_params:.1f}M params), {recipe.objective}, batch {cfg.batch_size}, "
          f"{cfg.steps} steps in {rounds} round(s) on {device}", file=sys.stderr)
    t0 = time.perf_counter()
    result = train_rounds(model, data, recipe, steps, rounds, str(device))
    k = min(3, max(1, len(result.losses) // 2))
    first, last = _mean(result.losses[:k]), _mean(result.losses[-k:])
    rate = result.steps / result.seconds if result.seconds else float("nan")
    print(f"loss first {first:.4f} -> last {last:.4f} (mean of {k} steps); {result.steps} steps, "
          f"{rate:.2f} steps/s, {result.examples / max(result.seconds, 1e-9):.0f} images/s")
    scores = evaluate_local(model, data, cfg)
    print("held-out: " + ", ".join(f"{k_}={v:.4f}" for k_, v in scores.items() if k_ != "eval_examples")
          + f" ({int(scores.get('eval_examples', 0))} images)")
    needs_labels = REGISTRY[recipe.objective]().needs_labels
    meta = {
        "model": recipe.model,
        "in_chans": 1,
        "image_size": recipe.image_size,
        "objective": recipe.objective,
        "steps": result.steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "optimizer": cfg.optimizer,
        "temperature": cfg.temperature,
        "seed": recipe.seed,
        "norm": recipe.norm,
        "label_fields": recipe.label_fields if needs_labels else "",
        "recipe": json.dumps({**recipe.recipe_dict(), "steps": steps, "rounds": rounds}, sort_keys=True),
        "images": len(data),
        "final_loss": f"{last:.6f}",
        "input": "grayscale [0,1], no mean/std normalisation",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": "fedrad pretrain (centralised)",
    }
    if init_record is not None:
        meta["init"] = json.dumps(init_record.to_json(), sort_keys=True)
    save_backbone(model.backbone, out, meta)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f}s)")
    return Path(out)
