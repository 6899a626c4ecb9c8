"""Which normalisation policy for non-IID sites: BatchNorm, averaged or site-local statistics, or GroupNorm.

PneumoniaMNIST's official train images are split into the 3 label-skewed hospitals of bench_label_efficiency
(`write_hospitals`: hospital 0 mostly normal films, hospital 2 mostly pneumonia). Each policy pretrains with
in-process FedAvg of `train_local` (SimCLR, same model, steps and seeds):

* batch: BatchNorm, every tensor averaged, running statistics included (fedrad today);
* group: GroupNorm (`norm = "group"`, no running statistics at all).

Site-local BN statistics (SiloBN, Andreux et al. 2020: weights and BN affine parameters averaged, running
mean/variance never averaged) need no pretraining run of their own: training runs BatchNorm in train mode, which
normalises with the batch's statistics and never reads the running ones, so the averaged weights are bit-identical
with or without local statistics (seen here: a SiloBN FedAvg gave exactly the probe AUCs of the recalibrated
BatchNorm one). The policy differs only at inference, where a site uses statistics of its own images. So the
BatchNorm backbone is probed twice: with the statistics it was released with (averaged), and "site-local":
its running statistics re-estimated on the probing site's own (unlabelled) training images. Probe: fedrad
finetune's `run_experiment`, linear on frozen features, official test split, 1/10/100 %
of the train labels, 3 label-subsample seeds, bootstrap CI.

    python benchmarks/bench_norm_policy.py                 # 2 pretraining seeds, ~15-25 min on 2 cores
    python benchmarks/bench_norm_policy.py --seeds 0 --no-record

PneumoniaMNIST: CC BY 4.0, MedMNIST (Yang et al., Scientific Data 2023).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_label_efficiency import write_hospitals  # noqa: E402
from common_bench import fedavg_in_process, record_row, shared_data  # noqa: E402

FRACTIONS = [0.01, 0.1, 1.0]
POLICIES = ("batch", "group")



def fedavg(sites: list, policy: str, args, seed: int):
    """In-process FedAvg of SimCLR `train_local` (every tensor averaged; "group": GroupNorm model)."""
    import torch

    from fedrad.client.training.trainer import TrainConfig
    from fedrad.common.models import build_model

    torch.manual_seed(seed)
    model = build_model(args.model, "simclr", args.image_size, proj_dim=64,
                        norm="group" if policy == "group" else "batch")
    cfg = TrainConfig(objective="simclr", steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                      device="cpu", image_size=args.image_size)
    fedavg_in_process(model, sites, args.rounds, lambda rnd: cfg, seed)
    return model.backbone.eval()


def recalibrated(backbone, images: np.ndarray, size: int, batch_size: int = 256):
    """A copy whose BatchNorm running statistics are re-estimated (cumulative mean) on `images`, weights unchanged."""
    import torch
    import torch.nn.functional as F

    out = copy.deepcopy(backbone)
    bns = [m for m in out.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    out.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).unsqueeze(1)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out(x)
    return out.eval()


def main() -> int:
    import torch

    from fedrad.client.site.site_data import load_site
    from fedrad.client.tools.finetune import Arm, load_npz, random_arm, run_experiment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="pretraining seeds")
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--probe-seeds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/fedrad-bench-norm-policy")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = shared_data()
    src = root / "pneumoniamnist" / "pneumoniamnist_28.npz" if root else None
    if src is None or not src.is_file():
        print("bench_norm_policy: no shared PneumoniaMNIST (set FEDRAD_SHARED_DATA)", file=sys.stderr)
        return 2
    work = Path(args.work)
    d = np.load(src)
    site_dirs = write_hospitals(d["train_images"], d["train_labels"].ravel(), work / "sites", seed=0)
    sites = [load_site(s, args.image_size, cache_dir=work / "cache" / s.name, progress=False) for s in site_dirs]
    data = load_npz(src, args.image_size)
    train_idx, test_idx = data.split["train"], data.split["test"]
    calib = data.images[train_idx]
    command = "python benchmarks/bench_norm_policy.py " + shlex.join(sys.argv[1:])
    print(f"sites {[len(s) for s in sites]} images; {args.rounds} rounds x {args.local_steps} steps x 3 sites, "
          f"batch {args.batch_size}, {args.model} {args.image_size}px", flush=True)
    rnd_rows = run_experiment([random_arm(args.model, args.image_size)], data, train_idx, test_idx, FRACTIONS,
                              "linear", seeds=args.probe_seeds)
    rnd = {r["fraction"]: r for r in rnd_rows}
    print("random-init: " + ", ".join(f"{f:.0%} {rnd[f]['auc']:.3f}" for f in FRACTIONS), flush=True)
    for seed in args.seeds:
        for policy in args.policies:
            t0 = time.perf_counter()
            backbone = fedavg(sites, policy, args, seed)
            seconds = time.perf_counter() - t0
            arms = []
            if policy == "group":
                arms.append(Arm("group", backbone, args.image_size))
            else:
                arms += [Arm("batch, averaged stats", backbone, args.image_size),
                         Arm("batch, site-local stats", recalibrated(backbone, calib, args.image_size),
                             args.image_size)]
            rows = run_experiment(arms, data, train_idx, test_idx, FRACTIONS, "linear", seeds=args.probe_seeds)
            for arm in arms:
                by = {r["fraction"]: r for r in rows if r["backbone"] == arm.name}
                cells = [f"{by[f]['auc']:.3f} [{by[f]['ci_low']:.3f}, {by[f]['ci_high']:.3f}]" for f in FRACTIONS]
                g = by[FRACTIONS[0]]["auc"] - rnd[FRACTIONS[0]]["auc"]
                print(f"{arm.name:<40} seed {seed}: " + "  ".join(cells) + f"  gap 1 % {g:+.3f}  {seconds:.0f}s",
                      flush=True)
                if not args.no_record:
                    ctx = {"command": command, "policy": arm.name, "pretraining seed": seed,
                           "schedule": f"{args.rounds} x {args.local_steps} steps x 3 sites, batch {args.batch_size}",
                           "model": f"{args.model} {args.image_size}px", "pretrain_s": round(seconds),
                           "random_init_auc": "/".join(f"{rnd[f]['auc']:.3f}" for f in FRACTIONS)}
                    for f, cell in zip(FRACTIONS, cells, strict=True):
                        record_row("norm_policy", f"AUC {f:.0%}", round(by[f]["auc"], 3), "AUC", text=cell, **ctx)
                    record_row("norm_policy", "gap vs random 1 %", round(g, 3), "AUC", **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
