"""Multi-process training at one site: samples/s of trainer.train_local (one process) vs
client.ddp.train_distributed with N processes, same global batch, same steps.

samples/s = images of the global batch per second of the training loop (rank 0's loop; the N-process start,
spawn plus imports, is reported apart as `start s`). On CPU the ranks use gloo and split the torch threads; on
2 cores this reports scaling, it is not a goal. With --device cuda each rank takes one GPU (NCCL).
Run: python benchmarks/bench_ddp.py [--procs 2] [--device cpu] [--model test_resnet] [--image-size 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import append_result, machine, today  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    import torch
    from fake_site import make_fake_site

    from fedrad.client.training.ddp import train_distributed
    from fedrad.client.training.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model

    data = make_fake_site(n=512, size=args.image_size)
    torch.manual_seed(0)
    model = build_model(args.model, "simclr", args.image_size, proj_dim=64)
    cfg = TrainConfig(objective="simclr", steps=args.steps, batch_size=args.batch_size, device=args.device)
    load_start = os.getloadavg()[0]
    one = train_local(copy.deepcopy(model), data, cfg, progress=False)
    t0 = time.perf_counter()
    many = train_distributed(copy.deepcopy(model), data, cfg, args.procs)
    start = time.perf_counter() - t0 - many.seconds
    rate1, rate_n = one.examples / one.seconds, many.examples / many.seconds
    load = f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}" + (f"; {args.note}" if args.note else "")
    print(f"1 process {rate1:.1f} samples/s; {args.procs} processes {rate_n:.1f} samples/s "
          f"({rate_n / rate1:.2f}x); start {start:.1f} s")
    append_result(
        "multi-process training at one site (issue 26; samples/s of the training loop, same global batch)",
        "| date | machine | device | model | image | batch | steps | 1 process | N processes | N | scaling | "
        "start s | load | command |",
        f"| {today()} | {machine()} | {args.device} | {args.model} | {args.image_size} | {args.batch_size} | "
        f"{args.steps} | {rate1:.1f} | {rate_n:.1f} | {args.procs} | {rate_n / rate1:.2f}x | {start:.1f} | {load} | "
        f"`python benchmarks/bench_ddp.py --procs {args.procs} --device {args.device} --model {args.model} "
        f"--image-size {args.image_size}` |",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
