"""Multi-process training at one site: samples/s of trainer.train_local (one process) vs
client.ddp.train_distributed with N processes, same global batch, same steps.

samples/s = images of the global batch per second of the training loop (rank 0's loop; the N-process start,
spawn plus imports, is reported apart as `start s`). On CPU the ranks use gloo and split the torch threads; on
2 cores this reports scaling, it is not a goal. With --device cuda each rank takes one GPU (NCCL).
--dp: sample-level DP-SGD instead (SimSiam, GroupNorm model, ghost clipping, dp-noise 1, dp-clip 1): one
Poisson draw of the global batch per step, each rank clips its slice, the noise is added once (rows: mode "dp").
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
from common_bench import bench_command, record_row  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dp", action="store_true", help="sample-level DP-SGD (SimSiam, GroupNorm, ghost clipping)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    import torch
    from fake_site import make_fake_site

    from fedrad.client.training.ddp import train_distributed
    from fedrad.client.training.sample_dp import SampleDP
    from fedrad.client.training.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model

    data = make_fake_site(n=512, size=args.image_size)
    torch.manual_seed(0)
    objective = "simsiam" if args.dp else "simclr"
    model = build_model(args.model, objective, args.image_size, proj_dim=64, norm="group" if args.dp else "batch")
    cfg = TrainConfig(objective=objective, steps=args.steps, batch_size=args.batch_size, device=args.device)
    dp = SampleDP(1.0, 1.0, 1e-5) if args.dp else None  # Poisson batches: samples/s counts the images drawn
    load_start = os.getloadavg()[0]
    one = train_local(copy.deepcopy(model), data, cfg, progress=False, dp=dp)
    t0 = time.perf_counter()
    many = train_distributed(copy.deepcopy(model), data, cfg, args.procs, dp=dp)
    start = time.perf_counter() - t0 - many.seconds
    rate1, rate_n = one.examples / one.seconds, many.examples / many.seconds
    print(f"{'dp' if args.dp else 'plain'}: 1 process {rate1:.1f} samples/s; {args.procs} processes "
          f"{rate_n:.1f} samples/s ({rate_n / rate1:.2f}x); start {start:.1f} s")
    ctx = {"command": bench_command(__file__), "device": args.device, "model": args.model, "image": args.image_size,
           "batch": args.batch_size, "steps": args.steps, "N": args.procs, "load_start": round(load_start, 2),
           "note": args.note, "mode": "dp" if args.dp else "plain"}
    record_row("ddp", "1 process", round(rate1, 1), "samples/s", **ctx)
    record_row("ddp", "N processes", round(rate_n, 1), "samples/s", **ctx)
    record_row("ddp", "scaling", round(rate_n / rate1, 2), "x", **ctx)
    record_row("ddp", "start s", round(start, 1), "s", **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
