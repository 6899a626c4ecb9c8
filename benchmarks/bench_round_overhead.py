"""Round overhead: what a federated round costs above its slowest site's own work, warm vs fresh site runtime.

A real SuperLink and `--sites` SuperNodes on loopback run fedrad's ServerApp and the sites' runtime
(client/runtime/site_runtime.py), once per site-runtime mode, side by side in one invocation:
- `warm`: one long-lived worker process per run at each site (the default runtime);
- `fresh`: `--fresh-process-per-message`, a fresh process per message (the runtime before issue 13).
From metrics.jsonl (rounds 2+ mean; round 1 also decodes the sites' caches and starts the workers):
fixed overhead = round wall time - the slowest site's handler seconds (`time_overhead`,
fedrad.server.rounds documents the fields), and ratio = round wall time / the slowest site's handler seconds.
`--eval` picks how held-out metrics are measured: `message` (an evaluate message per round, the old
default), `in-train` (run-config eval-in-train: one message per round) or `off` (fraction-evaluate 0).
Rows go to benchmarks/results/round_overhead.jsonl.
Run: python benchmarks/bench_round_overhead.py [--size small|realistic] [--modes warm,fresh] [--eval in-train]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import bench_command, record_row  # noqa: E402

SIZES = {
    "small": {"model": "test_resnet", "image-size": 32, "local-steps": 5, "batch-size": 8, "proj-dim": 32},
    "medium": {"model": "resnet18", "image-size": 64, "local-steps": 30, "batch-size": 32, "proj-dim": 128},
    # The issue's realistic local round: ~5 min of compute per site on 2 CPU cores.
    "realistic": {"model": "resnet18", "image-size": 128, "local-steps": 200, "batch-size": 32, "proj-dim": 128},
}
EVAL = {"message": {"fraction-evaluate": 1.0}, "in-train": {"fraction-evaluate": 0.0, "eval-in-train": True},
        "off": {"fraction-evaluate": 0.0}}
TIMED = ("round_seconds", "time_overhead", "time_send", "time_wait", "time_site_compute_max", "time_aggregate",
         "time_checkpoint")


def federated(sites: list[Path], cfg: dict, work: Path, rounds: int, fresh: bool, threads: int) -> list[dict]:
    """Per-round timing fields of one run with every site in the given runtime mode."""
    from federation_harness import Consortium

    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.server.run_log import read_metrics

    c = Consortium(work)
    try:
        c.start_link()
        for i, site in enumerate(sites):
            c.start_node(f"s{i}", site, trust=SiteTrust(consortium_key=c.consortium_pub,
                                                        fresh_process_per_message=fresh),
                         config={"threads": threads} if threads else None)
        n = len(sites)
        overrides = dict(cfg, objective="simclr", **{"num-server-rounds": rounds, "run-dir": str(work / "run"),
                                                       "round-timeout": 3600.0,
                                                       "min-train-nodes": n, "min-available-nodes": n})
        code = c.run(overrides, timeout=3600)
        if code != 0:
            raise RuntimeError(f"federated run failed; see {work / 'logs'}")
        return [{k: float(r.get(k) or 0.0) for k in TIMED} for r in read_metrics(work / "run")]
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--modes", default="warm,fresh", help="site runtimes to compare: warm, fresh")
    ap.add_argument("--eval", choices=sorted(EVAL), default="in-train", dest="eval_mode")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per site (0: torch's default)")
    ap.add_argument("--local-steps", type=int, default=0,
                    help="override the size's local steps (e.g. the realistic model and image size at a local round "
                         "that fits the machine: 3 sites x 200 steps of resnet18 128 px is ~1 h per round on 2 cores)")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the row)")
    args = ap.parse_args()
    from fedrad.deploy.synthetic import write_synthetic_sites

    cfg = dict(SIZES[args.size], **EVAL[args.eval_mode])
    if args.local_steps:
        cfg["local-steps"] = args.local_steps
    rows = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sites = write_synthetic_sites(tmp / "sites", n_sites=args.sites, patients_per_site=20, size=128)
        for mode in args.modes.split(","):
            fed = federated(sites, cfg, tmp / mode, args.rounds, mode == "fresh", args.threads)
            later = fed[1:] or fed
            split = {k: sum(r[k] for r in later) / len(later) for k in TIMED}
            ratio = split["round_seconds"] / max(split["time_site_compute_max"], 1e-9)
            rows.append((mode, fed[0]["round_seconds"], split, ratio))
    print(f"{'runtime':>8} {'round 1 s':>9} {'round 2+ s':>10} {'slowest site s':>14} {'overhead s':>10} {'ratio':>6}")
    for mode, first, split, ratio in rows:
        print(f"{mode:>8} {first:>9.2f} {split['round_seconds']:>10.2f} {split['time_site_compute_max']:>14.2f} "
              f"{split['time_overhead']:>10.2f} {ratio:>5.2f}x")
        print("          rounds 2+: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        ctx = {"command": bench_command(__file__), "runtime": mode, "sites": args.sites,
               "size": f"{args.size} ({cfg['model']} {cfg['image-size']} px, {cfg['local-steps']} steps, "
                       f"batch {cfg['batch-size']})", "eval": args.eval_mode, "load_start": round(load_start, 2),
               "note": args.note}
        record_row("round_overhead", "round 1", round(first, 2), "s", **ctx)
        for metric, key in (("round 2+", "round_seconds"), ("slowest site", "time_site_compute_max"),
                            ("overhead", "time_overhead"), ("send", "time_send"), ("wait", "time_wait"),
                            ("aggregate", "time_aggregate"), ("checkpoint", "time_checkpoint")):
            record_row("round_overhead", metric, round(split[key], 2), "s", **ctx)
        record_row("round_overhead", "ratio", round(ratio, 2), "x", goal="<= 1.10x at a realistic round",
                   met=(ratio <= 1.10) if args.size == "realistic" else None, **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
