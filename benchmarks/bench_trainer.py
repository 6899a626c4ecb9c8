"""Throughput of fedrad's `train_local` against a bare PyTorch loop doing the same work.

Same model init, batch, objective, optimizer and augmentation code in both; the bare loop has none of
fedrad's bookkeeping (sampler, per-step metrics, progress, clipping, split). Runs alternate (bare, fedrad,
bare, ...) so drift in machine load hits both; the best repeat of each is compared. Records rows in
benchmarks/results/trainer.jsonl (`common_bench.record_row`).

  python benchmarks/bench_trainer.py                                   # CPU: test_resnet 32 px
  python benchmarks/bench_trainer.py --model resnet50 --image-size 224 --batch 64 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedrad.client.training.trainer import TrainConfig, resolve_device, train_local
from fedrad.common.augment import AugmentConfig, make_views
from fedrad.common.losses import get_objective
from fedrad.common.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from common_bench import bench_command, machine, record_row  # noqa: E402


@dataclass
class SynthSite:
    """SiteData-shaped synthetic site: smooth shapes on a gradient, 4 patients' worth of labels."""

    images: np.ndarray
    image_size: int
    patient_keys: list[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.images)

    def label_ids(self, fields: list[str]) -> np.ndarray:
        return np.arange(len(self)) % 4

    def group_ids(self) -> np.ndarray:
        return np.arange(len(self)) // 2

    def as_float(self, idx) -> torch.Tensor:
        return torch.from_numpy(self.images[np.asarray(idx)].astype(np.float32) / 65535.0).unsqueeze(1)


def synth_site(n: int, size: int, seed: int = 0) -> SynthSite:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs = []
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.2, 0.2, 2)
        r = np.hypot(xx - cx, yy - cy)
        img = 0.2 + 0.3 * yy + 0.5 * (r < 0.1 + 0.05 * (i % 4)) + rng.normal(0, 0.02, (size, size))
        imgs.append((np.clip(img, 0, 1) * 65535).astype(np.uint16))
    return SynthSite(np.stack(imgs), size, [f"p{i // 2}" for i in range(n)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, site, cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """The minimal loop: random batch, two views, objective loss, AdamW step. Returns seconds."""
    objective = get_objective(cfg.objective, cfg.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    g_idx = torch.Generator().manual_seed(cfg.seed)
    g_aug = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    aug = AugmentConfig()
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16"
           else contextlib.nullcontext())
    cl = bool(cfg.channels_last)
    labels_all = torch.from_numpy(site.label_ids([])).to(device)
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(site), generator=g_idx)[: cfg.batch_size].numpy()
        x = site.as_float(idx).to(device, non_blocking=True)
        v1, v2 = make_views(x, aug, g_aug)
        if cl:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        labels = labels_all[torch.from_numpy(idx).to(device)] if objective.needs_labels else None
        with amp:
            loss = objective.loss(model, v1, v2, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def fedrad_loop(model, site, cfg: TrainConfig, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    train_local(model, site, cfg, progress=False)
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--objective", default="simclr", choices=["simclr", "supcon", "micle", "simsiam"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-record", action="store_true", help="print only; record no rows")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    site = synth_site(args.images, args.image_size)
    torch.manual_seed(0)
    init = build_model(args.model, args.objective, args.image_size)
    cfg = TrainConfig(objective=args.objective, steps=args.steps, batch_size=args.batch, lr=3e-4,
                      device=str(device), seed=0, amp=amp, channels_last=device.type == "cuda",
                      holdout=False)
    bare_model = copy.deepcopy(init).to(device)
    ours_model = copy.deepcopy(init).to(device)
    if cfg.channels_last:
        bare_model.to(memory_format=torch.channels_last)

    # warm-up both (allocator, cudnn autotune, thread pools)
    bare_loop(bare_model, site, cfg, device, args.warmup)
    train_local(ours_model, site, TrainConfig(**{**cfg.__dict__, "steps": args.warmup}), progress=False)

    bare_t, ours_t = [], []
    for r in range(args.repeats):
        bare_t.append(bare_loop(bare_model, site, cfg, device, args.steps))
        ours_t.append(fedrad_loop(ours_model, site, cfg, device))
        print(f"repeat {r + 1}/{args.repeats}: bare {args.steps / bare_t[-1]:.2f} steps/s, "
              f"fedrad {args.steps / ours_t[-1]:.2f} steps/s", file=sys.stderr)
    bare_sps, ours_sps = args.steps / min(bare_t), args.steps / min(ours_t)
    ratio = ours_sps / bare_sps
    imgs = 2 * args.batch  # two views per image
    print(f"\n{'loop':<8} {'steps/s':>9} {'views/s':>9}")
    print(f"{'bare':<8} {bare_sps:>9.2f} {bare_sps * imgs:>9.0f}")
    print(f"{'fedrad':<8} {ours_sps:>9.2f} {ours_sps * imgs:>9.0f}")
    verdict = "ok" if ratio >= 0.95 else "BELOW GOAL"
    print(f"ratio fedrad/bare = {ratio:.3f} (goal >= 0.95: {verdict})")
    print(f"{args.model} {args.image_size}px batch {args.batch} {args.objective} on {device} amp={amp}; "
          f"{machine()}")

    if not args.no_record:
        ctx = {"command": bench_command(__file__, argv), "torch": torch.__version__, "model": args.model,
               "px": args.image_size, "batch": args.batch, "objective": args.objective, "device/amp": f"{device}/{amp}"}
        record_row("trainer", "bare steps/s", round(bare_sps, 2), "steps/s", **ctx)
        record_row("trainer", "fedrad steps/s", round(ours_sps, 2), "steps/s", **ctx)
        record_row("trainer", "ratio", round(ratio, 3), "x", goal=">= 0.95", met=ratio >= 0.95, **ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
