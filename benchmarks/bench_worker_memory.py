"""Warm worker memory: the RSS of one site's warm worker process across many small rounds must not grow.

A real SuperLink and one SuperNode on loopback (fedrad's runtime, warm worker per run) run `--rounds` small
rounds with eval-in-train. A sampler reads the worker's RSS (psutil) after every round's line lands in
metrics.jsonl. Printed and recorded (worker_memory.jsonl): RSS after round 1, after round `--settle`, at the end and
the peak, and the growth from round `--settle` to the end (the first rounds import, decode and allocate).
Run: python benchmarks/bench_worker_memory.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common_bench import bench_command, record_row  # noqa: E402

SMALL = {"model": "test_resnet", "image-size": 32, "local-steps": 3, "batch-size": 8, "proj-dim": 32,
         "fraction-evaluate": 0.0, "eval-in-train": True, "objective": "simclr"}
WORKER_STARTED = re.compile(r"warm worker (\d+) started for run (\d+)")
MIB = 1024 * 1024


def _worker_pid(log: Path) -> int | None:
    found = WORKER_STARTED.findall(log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1][0]) if found else None


def sample_rss(log: Path, run_dir: Path, stop: threading.Event, out: dict[int, int]) -> None:
    """RSS of the site's worker each time a new round line appears: {round: bytes}."""
    import psutil

    from fedrad.server.run_log import read_metrics

    while not stop.is_set():
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        pid = _worker_pid(log)
        if rows and pid and rows[-1]["round"] not in out:
            try:
                out[rows[-1]["round"]] = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--settle", type=int, default=5, help="growth is measured from this round on")
    args = ap.parse_args()
    from federation_harness import Consortium

    from fedrad.deploy.synthetic import write_synthetic_sites

    load_start = os.getloadavg()[0]
    rss: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (site,) = write_synthetic_sites(tmp / "sites", n_sites=1, patients_per_site=20, size=128)
        c = Consortium(tmp / "fed")
        stop = threading.Event()
        run_dir = tmp / "fed" / "run"
        sampler = threading.Thread(target=sample_rss, args=(tmp / "fed" / "logs" / "node-s0.log", run_dir, stop, rss))
        t0 = time.perf_counter()
        try:
            c.start_link()
            c.start_node("s0", site, config={"threads": 1})
            sampler.start()
            code = c.run(dict(SMALL, **{"num-server-rounds": args.rounds, "run-dir": str(run_dir),
                                        "min-train-nodes": 1, "min-available-nodes": 1}), timeout=3600)
            time.sleep(0.5)
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
            c.stop()
        wall = time.perf_counter() - t0
    if code != 0 or not rss:
        print(f"run failed (exit {code}) or no worker RSS sampled", file=sys.stderr)
        return 1
    rounds = sorted(rss)
    settle = min((r for r in rounds if r >= args.settle), default=rounds[0])
    first, settled, last, peak = rss[rounds[0]], rss[settle], rss[rounds[-1]], max(rss.values())
    growth = last - settled
    print(f"worker RSS MiB: round {rounds[0]} {first / MIB:.1f}, round {settle} {settled / MIB:.1f}, "
          f"round {rounds[-1]} {last / MIB:.1f}, peak {peak / MIB:.1f}; growth {settle}->{rounds[-1]}: "
          f"{growth / MIB:+.1f} MiB; {len(rounds)} samples, {wall:.0f} s")
    ctx = {"command": bench_command(__file__), "rounds": rounds[-1], "load_start": round(load_start, 2)}
    record_row("worker_memory", "RSS round 1 MiB", round(first / MIB, 1), "MiB", **ctx)
    record_row("worker_memory", "RSS settled MiB", round(settled / MIB, 1), "MiB", settle_round=settle, **ctx)
    record_row("worker_memory", "RSS end MiB", round(last / MIB, 1), "MiB", **ctx)
    record_row("worker_memory", "peak MiB", round(peak / MIB, 1), "MiB", **ctx)
    record_row("worker_memory", "growth settled->end MiB", round(growth / MIB, 1), "MiB", **ctx)
    record_row("worker_memory", "wall s", round(wall), "s", **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
