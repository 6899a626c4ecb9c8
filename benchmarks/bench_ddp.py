"""Multi-process training at one site: samples/s of trainer.train_local (one process) vs
client.training.ddp.train_distributed with N processes, same global batch, same steps.

samples/s = images of the global batch per second of the training loop (rank 0's loop; the N-process start,
spawn plus imports, is reported apart as `start_s`). On CPU the ranks use gloo and split the torch threads; on
2 cores this reports scaling, it is not a goal. With --device cuda each rank takes one GPU (NCCL).
--dp: sample-level DP-SGD instead (SimSiam, GroupNorm model, ghost clipping, dp-noise 1, dp-clip 1): one
Poisson draw of the global batch per step, each rank clips its slice, the noise is added once (issue 26).
Rows go to benchmarks/results/ddp.jsonl (one JSON object per measurement), prose to benchmarks/notes/ddp.md.
Run: python benchmarks/bench_ddp.py [--procs 2] [--device cpu] [--model test_resnet] [--image-size 64] [--dp]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import machine  # noqa: E402

BENCH = "ddp"


def record_row(metric: str, value: float | None, unit: str, command: str, note: str = "", **extra) -> None:
    """One measurement as one JSON line in benchmarks/results/ddp.jsonl (common_bench.record_row's format)."""
    try:
        from common_bench import record_row as shared
    except ImportError:
        shared = None
    if shared is not None:
        shared(BENCH, metric, value, unit, command=command, goal=None, met=None, note=note, **extra)
        return
    row = {"bench": BENCH, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "load": os.getloadavg()[0],
           "command": command, "metric": metric, "value": value, "unit": unit, "goal": None, "met": None,
           "note": note, **extra}
    out = Path(__file__).parent / "results" / f"{BENCH}.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


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
    dp = SampleDP(1.0, 1.0, 1e-5) if args.dp else None
    load_start = os.getloadavg()[0]
    one = train_local(copy.deepcopy(model), data, cfg, progress=False, dp=dp)
    t0 = time.perf_counter()
    many = train_distributed(copy.deepcopy(model), data, cfg, args.procs, dp=dp)
    start = time.perf_counter() - t0 - many.seconds
    rate1, rate_n = one.examples / one.seconds, many.examples / many.seconds
    mode = "dp-sample (ghost, noise 1, clip 1)" if args.dp else "plain"
    print(f"{mode}: 1 process {rate1:.1f} samples/s; {args.procs} processes {rate_n:.1f} samples/s "
          f"({rate_n / rate1:.2f}x); start {start:.1f} s")
    command = (f"python benchmarks/bench_ddp.py --procs {args.procs} --device {args.device} --model {args.model} "
               f"--image-size {args.image_size} --batch-size {args.batch_size} --steps {args.steps}"
               + (" --dp" if args.dp else ""))
    note = f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}" + (f"; {args.note}" if args.note else "")
    extra = {"mode": mode, "device": args.device, "model": args.model, "image_size": args.image_size,
             "batch_size": args.batch_size, "steps": args.steps, "procs": args.procs, "start_s": round(start, 1)}
    record_row("samples/s, 1 process", round(rate1, 2), "samples/s", command, note, **extra)
    record_row(f"samples/s, {args.procs} processes", round(rate_n, 2), "samples/s", command, note, **extra)
    record_row(f"scaling, {args.procs} processes vs 1", round(rate_n / rate1, 3), "x", command, note, **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
