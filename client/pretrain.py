"""`fedrad pretrain`: centralised contrastive pretraining on one folder, the baseline federated runs beat.

Same model, loop and file format as a federated run, so the two are directly comparable.
"""

from __future__ import annotations

import argparse
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


def _apply_init(model, args: argparse.Namespace):
    """`--init`: the backbone from a local timm checkpoint or a verified release (InitRecord); None without
    --init, or when the bundle is refused (said on stderr; the caller exits 1, as `fedrad verify` does)."""
    if not getattr(args, "init", None):
        return None
    from fedrad.common.bundle import BundleVerificationError
    from fedrad.common.init_weights import apply_init

    try:
        record = apply_init(model, args.init, args.init_pubkey, args.model, args.image_size,
                            getattr(args, "norm", "batch"))
    except BundleVerificationError as exc:
        print(f"fedrad pretrain: --init bundle verification FAILED: {exc}", file=sys.stderr)
        return None
    print(f"  init: {record.kind} {record.path} (sha256 {record.sha256[:16]}...)", file=sys.stderr)
    return record


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Load the site, train `args.steps` steps, evaluate on the held-out patients, write the backbone."""
    import torch

    from fedrad.client.site_data import load_site
    from fedrad.client.trainer import TrainConfig, evaluate_local, resolve_device, train_local
    from fedrad.common.models import build_model, save_backbone

    if args.steps < 1 or args.batch_size < 2 or args.image_size < 16:
        raise ValueError("need --steps >= 1, --batch-size >= 2 and --image-size >= 16")
    check_out_file(args.out)
    init = getattr(args, "init", None)
    if init:
        from fedrad.common.init_weights import init_kind

        init_kind(init, getattr(args, "init_pubkey", None))  # a bad path: one line before the data is loaded
    device = resolve_device(args.device)
    print(f"fedrad pretrain: loading {args.data} at {args.image_size} px", file=sys.stderr)
    data = load_site(args.data, args.image_size, cache_dir=args.cache, progress=True)
    skipped = sum((getattr(data, "skipped", None) or {}).values())
    print(f"  {len(data)} images usable, {skipped} skipped", file=sys.stderr)
    if len(data) < 2:
        raise ValueError(f"{args.data}: {len(data)} usable image(s); contrastive training needs at least 2")

    torch.manual_seed(args.seed)
    norm = getattr(args, "norm", "batch")
    model = build_model(args.model, args.objective, args.image_size, norm=norm)
    init_record = _apply_init(model, args)
    if init_record is None and init:
        return 1  # the bundle was refused (already said why)
    cfg = TrainConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      optimizer=getattr(args, "optimizer", "adamw"), temperature=getattr(args, "temperature", 0.1),
                      label_fields=args.label_fields, device=str(device), seed=args.seed,
                      image_size=args.image_size)
    n_params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    print(f"  {args.model} ({n_params:.1f}M params), {args.objective}, batch {cfg.batch_size}, "
          f"{cfg.steps} steps on {device}", file=sys.stderr)
    t0 = time.perf_counter()
    result = train_local(model, data, cfg, progress=True)
    k = min(3, max(1, len(result.losses) // 2))
    first, last = _mean(result.losses[:k]), _mean(result.losses[-k:])
    rate = result.steps / result.seconds if result.seconds else float("nan")
    print(f"loss first {first:.4f} -> last {last:.4f} (mean of {k} steps); {result.steps} steps, "
          f"{rate:.2f} steps/s, {result.examples / max(result.seconds, 1e-9):.0f} images/s")
    scores = evaluate_local(model, data, cfg)
    print("held-out: " + ", ".join(f"{k_}={v:.4f}" for k_, v in scores.items() if k_ != "eval_examples")
          + f" ({int(scores.get('eval_examples', 0))} images)")
    meta = {
        "model": args.model,
        "in_chans": 1,
        "image_size": args.image_size,
        "objective": args.objective,
        "steps": result.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": cfg.optimizer,
        "temperature": cfg.temperature,
        "seed": args.seed,
        "norm": norm,
        "label_fields": args.label_fields if args.objective == "supcon" else "",
        "images": len(data),
        "final_loss": f"{last:.6f}",
        "input": "grayscale [0,1], no mean/std normalisation",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": "fedrad pretrain (centralised)",
    }
    if init_record is not None:
        meta["init"] = json.dumps(init_record.to_json(), sort_keys=True)
    save_backbone(model.backbone, args.out, meta)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f}s)")
    return 0
