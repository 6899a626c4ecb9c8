"""Many sites: a loopback consortium of N sites (real SuperLink, real SuperNodes through fedrad's site runtime,
tiny model), one run without and one with SecAgg+, for each N in --sites.

Reported per N and mode, from metrics.jsonl (rounds 2+ mean; round 1 also decodes the caches and starts the
warm workers): round wall time, fixed overhead (round - slowest site's handler seconds), coordinator time in
aggregation; and memory sampled every 0.5 s with psutil over each site's process tree (runtime + SuperNode +
warm worker): the peak during the run, and the idle RSS 5 s after the run ended (the warm worker still alive,
between rounds as far as it knows), mean and max over the sites; plus the coordinator's tree (SuperLink +
ServerApp). Rows are appended to RESULTS.md.
Run: python benchmarks/bench_many_sites.py --sites 3,10,20 [--rounds 3] [--modes plain,secagg]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import append_result, machine, today  # noqa: E402

TINY = {"model": "test_resnet", "image-size": 32, "local-steps": 5, "batch-size": 8, "proj-dim": 32,
        "objective": "simclr", "fraction-evaluate": 0.0, "eval-in-train": True}
MB = 1024 * 1024


def tree_rss(pid: int) -> int:
    """RSS bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Sampler(threading.Thread):
    """Peak tree RSS per named process while running."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak = pids, dict.fromkeys(pids, 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_rss(pid))
            self.done.wait(0.5)


def consortium_run(sites: list[Path], work: Path, rounds: int, secagg: bool) -> dict:
    from federation_harness import Consortium

    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.server.run_log import read_metrics

    n = len(sites)
    c = Consortium(work)
    try:
        c.start_link()
        for i, site in enumerate(sites):
            c.start_node(f"s{i}", site, trust=SiteTrust(consortium_key=c.consortium_pub), config={"threads": 1})
        cfg = dict(TINY, **{"num-server-rounds": rounds, "run-dir": str(work / "run"), "round-timeout": 3600.0,
                            "min-train-nodes": n, "min-available-nodes": n})
        if secagg:
            cfg.update({"secagg": True, "secagg-shares": min(n, 3), "secagg-threshold": 2})
        pids = {name: proc.pid for name, proc in c.nodes.items()}
        pids["coordinator"] = c.link.pid
        sampler = Sampler(pids)
        sampler.start()
        t0 = time.perf_counter()
        code = c.run(cfg, timeout=3600)
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        if code != 0:
            raise RuntimeError(f"federated run failed; see {work / 'logs'}")
        time.sleep(5)
        idle = {name: tree_rss(pid) for name, pid in pids.items()}
        rows = read_metrics(work / "run")
        later = rows[1:] or rows
        mean = {k: sum(float(r.get(k) or 0.0) for r in later) / len(later)
                for k in ("round_seconds", "time_overhead", "time_aggregate", "time_site_compute_max")}
        site_names = [k for k in pids if k != "coordinator"]
        return {"wall": wall, "round1": float(rows[0]["round_seconds"]), **mean,
                "site_peak_mean": sum(sampler.peak[s] for s in site_names) / n / MB,
                "site_peak_max": max(sampler.peak[s] for s in site_names) / MB,
                "site_idle_mean": sum(idle[s] for s in site_names) / n / MB,
                "site_idle_max": max(idle[s] for s in site_names) / MB,
                "coord_peak": sampler.peak["coordinator"] / MB, "coord_idle": idle["coordinator"] / MB}
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="3,10,20", help="consortium sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="plain,secagg")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the row)")
    args = ap.parse_args()
    from fedrad.deploy.synthetic import write_synthetic_sites

    command = (f"`python benchmarks/bench_many_sites.py --sites {args.sites} --rounds {args.rounds} "
               f"--modes {args.modes}`")
    for n in [int(s) for s in args.sites.split(",")]:
        for mode in args.modes.split(","):
            load_start = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir)
                sites = write_synthetic_sites(tmp / "sites", n_sites=n, patients_per_site=10, size=64)
                r = consortium_run(sites, tmp / "fed", args.rounds, mode == "secagg")
            load = f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}" + (f"; {args.note}" if args.note else "")
            print(f"{n:>3} sites {mode:>6}: round 1 {r['round1']:.2f} s, rounds 2+ {r['round_seconds']:.2f} s, "
                  f"overhead {r['time_overhead']:.2f} s, aggregate {r['time_aggregate']:.2f} s; site RSS peak "
                  f"{r['site_peak_mean']:.0f} (max {r['site_peak_max']:.0f}) MB, idle {r['site_idle_mean']:.0f} "
                  f"(max {r['site_idle_max']:.0f}) MB; coordinator peak {r['coord_peak']:.0f} MB", flush=True)
            append_result(
                "many sites: round overhead and per-site memory vs consortium size (issue 26; rounds 2+ mean, "
                "seconds; RSS of each site's runtime + SuperNode + warm worker, MB)",
                "| date | machine | sites | mode | rounds | round 1 | round 2+ | overhead | aggregate | "
                "site peak RSS mean/max | site idle RSS mean/max | coordinator peak/idle RSS | load | command |",
                f"| {today()} | {machine()} | {n} | {mode} | {args.rounds} | {r['round1']:.2f} | "
                f"{r['round_seconds']:.2f} | {r['time_overhead']:.2f} | {r['time_aggregate']:.2f} | "
                f"{r['site_peak_mean']:.0f}/{r['site_peak_max']:.0f} | {r['site_idle_mean']:.0f}/"
                f"{r['site_idle_max']:.0f} | {r['coord_peak']:.0f}/{r['coord_idle']:.0f} | {load} | {command} |",
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
