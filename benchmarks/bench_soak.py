"""Soak: a long run of the tiny model at 3 loopback sites (real SuperLink, SuperNodes, site runtime), with a
coordinator restart in the middle (the ServerApp of a first run stops after --rounds/2, a second run resumes
the same run directory with resume = true up to --rounds).

Reported: RSS of the coordinator's process tree (SuperLink + ServerApp) and of each site's tree, sampled every
2 s, as the mean over the first and the last quarter of the rounds (goal: within 10 %); the coordinator's own
work per round (send + aggregate + checkpoint seconds from metrics.jsonl) over the first and last quarter
(goal: independent of the round number); whether the resumed run continued exactly (rounds 1..N each once in
metrics.jsonl, the latest checkpoint is round N, keep-checkpoints bounded the folder). Rows go to RESULTS.md.
Run: python benchmarks/bench_soak.py [--rounds 200] [--sites 3]
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
from bench_many_sites import MB, TINY, tree_rss  # noqa: E402
from common_bench import append_result, machine, today  # noqa: E402


class Series(threading.Thread):
    """(time, coordinator RSS, mean site RSS) every 2 s."""

    def __init__(self, coordinator: int, sites: list[int]) -> None:
        super().__init__(daemon=True)
        self.coordinator, self.sites, self.rows = coordinator, sites, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            site = sum(tree_rss(p) for p in self.sites) / len(self.sites)
            self.rows.append((time.time(), tree_rss(self.coordinator) / MB, site / MB))
            self.done.wait(2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    from federation_harness import Consortium

    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.checkpoint import latest_checkpoint
    from fedrad.server.run_log import read_metrics

    n, half = args.sites, args.rounds // 2
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sites = write_synthetic_sites(tmp / "sites", n_sites=n, patients_per_site=10, size=64)
        c = Consortium(tmp / "fed")
        try:
            c.start_link()
            for i, site in enumerate(sites):
                c.start_node(f"s{i}", site, trust=SiteTrust(consortium_key=c.consortium_pub), config={"threads": 1})
            run_dir = tmp / "fed" / "run"
            base = dict(TINY, **{"run-dir": str(run_dir), "round-timeout": 3600.0, "min-train-nodes": n,
                                 "min-available-nodes": n, "keep-checkpoints": 5})
            series = Series(c.link.pid, [p.pid for p in c.nodes.values()])
            series.start()
            t0 = time.time()
            first = c.run(dict(base, **{"num-server-rounds": half}), timeout=36000)
            t_restart = time.time()
            second = c.run(dict(base, **{"num-server-rounds": args.rounds, "resume": True}), timeout=36000)
            series.done.set()
            series.join()
            rows = read_metrics(run_dir)
            latest = latest_checkpoint(run_dir)
            kept = len(list((run_dir / "checkpoints").iterdir()))
        finally:
            c.stop()
    if first != 0 or second != 0:
        raise SystemExit(f"a run failed (exit {first}, {second})")
    rounds = [int(r["round"]) for r in rows]
    exact = rounds == list(range(1, args.rounds + 1)) and latest is not None and latest.name.endswith(
        f"{args.rounds:04d}.safetensors")
    q = max(1, args.rounds // 4)
    work = [float(r.get("time_send") or 0) + float(r.get("time_aggregate") or 0) + float(r.get("time_checkpoint") or 0)
            for r in rows]
    work_first, work_last = sum(work[1:q + 1]) / q, sum(work[-q:]) / q
    span = series.rows[-1][0] - t0
    early = [r for r in series.rows if r[0] - t0 >= 0.05 * span and r[0] - t0 <= 0.25 * span and r[0] < t_restart]
    late = [r for r in series.rows if r[0] - t0 >= 0.75 * span]
    coord = (sum(r[1] for r in early) / max(1, len(early)), sum(r[1] for r in late) / max(1, len(late)))
    site = (sum(r[2] for r in early) / max(1, len(early)), sum(r[2] for r in late) / max(1, len(late)))
    load = f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}" + (f"; {args.note}" if args.note else "")
    print(f"rounds {args.rounds} ({n} sites), restart after {half}: resumed exactly {exact}; checkpoints kept {kept}; "
          f"coordinator RSS {coord[0]:.0f} -> {coord[1]:.0f} MB; site RSS {site[0]:.0f} -> {site[1]:.0f} MB; "
          f"coordinator work/round {work_first:.3f} -> {work_last:.3f} s; wall {span / 60:.1f} min")
    append_result(
        "soak: a long run with a coordinator restart in the middle (issue 26; RSS MB, first vs last quarter)",
        "| date | machine | sites | rounds | resumed exactly | checkpoints kept | coordinator RSS | site RSS | "
        "coordinator work/round s | wall min | load | command |",
        f"| {today()} | {machine()} | {n} | {args.rounds} | {exact} | {kept} | {coord[0]:.0f} -> {coord[1]:.0f} | "
        f"{site[0]:.0f} -> {site[1]:.0f} | {work_first:.3f} -> {work_last:.3f} | {span / 60:.1f} | {load} | "
        f"`python benchmarks/bench_soak.py --rounds {args.rounds} --sites {n}` |",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
