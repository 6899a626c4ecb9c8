"""Round overhead: wall time of a federated round / the same local training + evaluation run alone.

Federated: a real SuperLink + one SuperNode on loopback, fedrad's ServerApp/ClientApp (fresh ClientApp
process per message, model arrays over HTTP, screening, checkpoint, metrics, plot).
Alone: the same site, model, steps and batch through `train_local` + `evaluate_local` in this process.
Printed for a small and a realistic round size; appended to RESULTS.md, with the round's own timing split
from metrics.jsonl (rounds 2+ mean): fixed overhead = round wall time - the slowest site's train handler
seconds, and how much of the round was waiting for the site (fedrad.server.rounds documents the fields).
Run: python benchmarks/bench_round_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import append_result, machine, today  # noqa: E402

SIZES = {
    "small": {"model": "test_resnet", "image-size": 32, "local-steps": 5, "batch-size": 8, "proj-dim": 32},
    "realistic": {"model": "resnet18", "image-size": 64, "local-steps": 30, "batch-size": 32, "proj-dim": 128},
}


def alone(site: Path, cfg: dict, cache: Path) -> float:
    """Seconds for the site's local work of one round, in-process (data already cached, as in round 2+)."""
    import torch

    from fedrad.client.site_data import load_site
    from fedrad.client.trainer import TrainConfig, evaluate_local, train_local
    from fedrad.common.models import build_model

    data = load_site(site, cfg["image-size"], cache_dir=cache, progress=False)
    tcfg = TrainConfig(objective="simclr", steps=cfg["local-steps"], batch_size=cfg["batch-size"], lr=3e-4,
                       device="cpu", image_size=cfg["image-size"], seed=0)
    torch.manual_seed(0)
    model = build_model(cfg["model"], "simclr", cfg["image-size"], proj_dim=cfg["proj-dim"])
    t0 = time.perf_counter()
    train_local(model, data, tcfg, progress=False)
    evaluate_local(model, data, tcfg)
    return time.perf_counter() - t0


TIMED = ("round_seconds", "time_overhead", "time_send", "time_wait", "time_site_compute_max", "time_checkpoint")


def federated(site: Path, cfg: dict, work: Path, rounds: int) -> list[dict]:
    from federation_harness import Consortium

    from fedrad.server.run_log import read_metrics

    c = Consortium(work)
    try:
        c.start_link()
        c.start_node("s0", site)
        overrides = dict(cfg, objective="simclr", **{"num-server-rounds": rounds, "run-dir": str(work / "run"),
                                                       "min-train-nodes": 1, "min-available-nodes": 1})
        code = c.run(overrides)
        if code != 0:
            raise RuntimeError(f"federated run failed; see {work / 'logs'}")
        return [{k: float(r.get(k) or 0.0) for k in TIMED} for r in read_metrics(work / "run")]
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small size only")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from fedrad.deploy.synthetic import write_synthetic_sites

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        site = write_synthetic_sites(tmp / "sites", n_sites=1, patients_per_site=20, size=128)[0]
        for name in (["small"] if args.quick else ["small", "realistic"]):
            cfg = SIZES[name]
            cache = tmp / f"fed-{name}" / "cache" / "s0"
            # Alone before and after the federated run, best of both: load from other work on the machine
            # then hurts the baseline no more than the federated side.
            local_before = alone(site, cfg, cache)
            fed = federated(site, cfg, tmp / f"fed-{name}", args.rounds)
            local = min(local_before, alone(site, cfg, cache))
            # Round 1 also decodes the site into its cache; rounds 2+ are the steady state.
            later = fed[1:] or fed
            split = {k: sum(r[k] for r in later) / len(later) for k in TIMED}
            steady = split["round_seconds"]
            rows.append((name, cfg, fed[0]["round_seconds"], steady, local, steady / local, split))
    print(f"{'size':>10} {'model':>12} {'px':>4} {'steps':>5} {'round 1 s':>9} {'round 2+ s':>10} "
          f"{'alone s':>8} {'overhead':>9}")
    for name, cfg, first, steady, local, ratio, split in rows:
        print(f"{name:>10} {cfg['model']:>12} {cfg['image-size']:>4} {cfg['local-steps']:>5} {first:>9.2f} "
              f"{steady:>10.2f} {local:>8.2f} {ratio:>8.2f}x")
        print("           rounds 2+: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        append_result(
            "round overhead: federated round / local training alone",
            "| date | machine | size | model | px | steps | batch | round 1 s | round 2+ s | alone s | ratio "
            "| command |",
            f"| {today()} | {machine()} | {name} | {cfg['model']} | {cfg['image-size']} | {cfg['local-steps']} | "
            f"{cfg['batch-size']} | {first:.2f} | {steady:.2f} | {local:.2f} | {ratio:.2f}x | "
            f"`python benchmarks/bench_round_overhead.py{' --quick' if args.quick else ''}` |",
        )
        append_result(
            "round time split (metrics.jsonl, rounds 2+ mean, seconds)",
            "| date | machine | size | round | site compute max | overhead | send | wait | checkpoint | command |",
            f"| {today()} | {machine()} | {name} | {split['round_seconds']:.2f} | {split['time_site_compute_max']:.2f} "
            f"| {split['time_overhead']:.2f} | {split['time_send']:.2f} | {split['time_wait']:.2f} | "
            f"{split['time_checkpoint']:.2f} | `python benchmarks/bench_round_overhead.py"
            f"{' --quick' if args.quick else ''}` |",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
