"""Soak: a long run of the tiny model at 3 loopback sites (real SuperLink, SuperNodes, site runtime), with a
coordinator restart in the middle (the ServerApp of a first run stops after --rounds/2, a second run resumes
the same run directory with resume = true up to --rounds).

Reported (rows in benchmarks/results/soak.jsonl, a plot in benchmarks/plots/soak_rss.png, at most ~200 points):
- RSS of the coordinator's process tree (SuperLink + ServerApp) and of each site's tree (runtime + SuperNode +
  warm worker), sampled every 2 s; per run segment (before / after the restart) the mean while its first
  quarter of rounds ran (after a 5 % warm-up) vs its last quarter, up to its last round (goal: within 10 %).
  Across the restart the sites hold a second warm worker for the new Flower run until the first one's idle
  timeout, so the segments are compared each on its own.
- the coordinator's own work per round (send + aggregate + checkpoint-and-plot seconds, metrics.jsonl) over the
  first vs the last quarter of the rounds, and its least-squares slope per 100 rounds (goal: flat).
- whether the resumed run continued exactly (rounds 1..N each once in metrics.jsonl, the latest checkpoint is
  round N), checkpoints kept (keep-checkpoints = 5), and every process log's files and bytes with a small
  rotation limit (FEDRAD_LOG_MAX_BYTES=64 KiB, FEDRAD_LOG_KEEP=3) so rotation really happens (goal: bounded).
The raw series goes to --raw (JSON) as it is taken, so a cut-off soak still says how far it got.
Run: python benchmarks/bench_soak.py [--rounds 200] [--sites 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from bench_many_sites import TINY, tree_rss  # noqa: E402
from common_bench import REPO, record_row  # noqa: E402
from memory_split import MIB  # noqa: E402

LOG_MAX_BYTES, LOG_KEEP = 64 * 1024, 3
PLOT = REPO / "benchmarks" / "plots" / "soak_rss.png"


def rounds_recorded(metrics: Path) -> int:
    """Rounds whose metrics line is written (a newline count: no parse, cheap every 2 s)."""
    try:
        return metrics.read_bytes().count(b"\n")
    except OSError:
        return 0


class Series(threading.Thread):
    """(time, coordinator RSS MB, mean site RSS MB, rounds recorded so far) every 2 s."""

    def __init__(self, coordinator: int, sites: list[int], metrics: Path) -> None:
        super().__init__(daemon=True)
        self.coordinator, self.sites, self.metrics, self.rows = coordinator, sites, metrics, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            site = sum(tree_rss(p) for p in self.sites) / len(self.sites)
            self.rows.append((time.time(), tree_rss(self.coordinator) / MIB, site / MIB, rounds_recorded(self.metrics)))
            self.done.wait(2.0)


def quarters(rows: list[tuple], start: float, end: float, first_round: int = 0,
             last_round: int = 0) -> tuple[float, float, float, float]:
    """(coordinator first, coordinator last, site first, site last) means of a segment [start, end].
    With rounds recorded per sample (4th field) the quarters are of the segment's rounds first_round..last_round:
    first = samples while rounds 5..25 % of them ran (start-up excluded), last = from 75 % until the last round's
    line (the run's end, which builds the model to export it, is not a round). Older raw files: of its time span."""
    seg = [r for r in rows if start <= r[0] <= end]
    if last_round > first_round and seg and len(seg[0]) > 3:
        n = last_round - first_round + 1

        def part(r) -> float:
            return (r[3] - first_round + 1) / n  # share of the segment's rounds done when sampled

        early = [r for r in seg if 0.05 <= part(r) <= 0.25] or seg[:1]
        late = [r for r in seg if 0.75 <= part(r) and r[3] < last_round] or seg[-1:]
    else:
        span = max(1e-9, end - start)
        early = [r for r in seg if 0.05 <= (r[0] - start) / span <= 0.25] or seg[:1]
        late = [r for r in seg if (r[0] - start) / span >= 0.75] or seg[-1:]

    def mean(rs, i):
        return sum(r[i] for r in rs) / max(1, len(rs))

    return mean(early, 1), mean(late, 1), mean(early, 2), mean(late, 2)


def slope_per_100(values: list[float]) -> float:
    """Least-squares slope of values against their index, per 100 steps."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return 100 * sum((i - mx) * (v - my) for i, v in enumerate(values)) / sxx


def log_usage(logs: Path) -> dict[str, dict[str, int]]:
    """Per process log: its files (the log and its rotated parts) and their bytes."""
    out: dict[str, dict[str, int]] = {}
    for f in sorted(logs.glob("*.log*")):
        base = f.name.split(".log")[0] + ".log"
        entry = out.setdefault(base, {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += f.stat().st_size
    return out


def plot(rows: list[tuple], t0: float, t_restart: float | None, path: Path, points: int = 200) -> None:
    """Coordinator and mean site RSS over time, at most `points` bucket means (2 s samples averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, -(-len(rows) // points))
    buckets = [rows[i:i + step] for i in range(0, len(rows), step)]
    xs = [(sum(r[0] for r in b) / len(b) - t0) / 60 for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [sum(r[1] for r in b) / len(b) for b in buckets], label="coordinator (SuperLink + ServerApp)")
    ax.plot(xs, [sum(r[2] for r in b) / len(b) for b in buckets], label="site, mean (runtime + SuperNode + worker)")
    if t_restart:
        ax.axvline((t_restart - t0) / 60, color="grey", linestyle=":", label="coordinator restart (resume)")
    ax.set(xlabel="minutes", ylabel="RSS MB", title=f"soak: RSS ({len(buckets)} points of {len(rows)} samples)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--note", default="")
    ap.add_argument("--raw", type=Path, default=Path(tempfile.gettempdir()) / "fedrad_soak_raw.json")
    ap.add_argument("--from-raw", type=Path, default=None, help="report a finished soak's raw JSON again")
    args = ap.parse_args()
    if args.from_raw:
        return report(json.loads(args.from_raw.read_text()), args)
    os.environ["FEDRAD_LOG_MAX_BYTES"] = str(LOG_MAX_BYTES)  # inherited by every process the harness starts
    os.environ["FEDRAD_LOG_KEEP"] = str(LOG_KEEP)
    from federation_harness import Consortium

    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.checkpoint import latest_checkpoint
    from fedrad.server.run_log import read_metrics

    n, half = args.sites, args.rounds // 2
    load_start = os.getloadavg()[0]
    t_restart = None
    codes: list[int] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sites = write_synthetic_sites(tmp / "sites", n_sites=n, patients_per_site=10, size=64)
        c = Consortium(tmp / "fed")
        run_dir = tmp / "fed" / "run"
        try:
            c.start_link()
            for i, site in enumerate(sites):
                c.start_node(f"s{i}", site, trust=SiteTrust(consortium_key=c.consortium_pub), config={"threads": 1})
            base = dict(TINY, **{"run-dir": str(run_dir), "round-timeout": 3600.0, "min-train-nodes": n,
                                 "min-available-nodes": n, "keep-checkpoints": 5})
            series = Series(c.link.pid, [p.pid for p in c.nodes.values()], run_dir / "metrics.jsonl")
            series.start()
            dumper_done = threading.Event()

            def dump() -> None:  # the raw series and rounds so far, every minute
                while not dumper_done.wait(60):
                    done = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
                    args.raw.write_text(json.dumps({"t0": t0, "t_restart": t_restart, "rounds_done": len(done),
                                                    "series": series.rows, "rows": done, "load_start": load_start,
                                                    "logs": log_usage(tmp / "fed" / "logs")}))

            t0 = time.time()
            threading.Thread(target=dump, daemon=True).start()
            codes.append(c.run(dict(base, **{"num-server-rounds": half}), timeout=36000))
            t_restart = time.time()
            if codes[0] == 0:
                codes.append(c.run(dict(base, **{"num-server-rounds": args.rounds, "resume": True}), timeout=36000))
            t_end = time.time()
            series.done.set()
            dumper_done.set()
            series.join()
            rows = read_metrics(run_dir)
            latest = latest_checkpoint(run_dir)
            kept = len(list((run_dir / "checkpoints").iterdir())) if (run_dir / "checkpoints").is_dir() else 0
        finally:
            c.stop()
        logs = log_usage(tmp / "fed" / "logs")  # after stop: every pump has written its last line
    raw = {"t0": t0, "t_restart": t_restart, "t_end": t_end, "rounds_done": len(rows), "series": series.rows,
           "logs": logs, "codes": codes, "rows": rows, "latest": latest.name if latest else None, "kept": kept,
           "load_start": load_start}
    args.raw.write_text(json.dumps(raw))
    return report(raw, args)


def report(raw: dict, args) -> int:
    """Rows, the plot and a summary line from the raw measurements (also: --from-raw FILE)."""
    t0, t_restart, t_end, codes, rows = raw["t0"], raw["t_restart"], raw["t_end"], raw["codes"], raw["rows"]
    series_rows, logs, kept, latest = raw["series"], raw["logs"], raw["kept"], raw["latest"]
    n, half, load_start = args.sites, args.rounds // 2, raw["load_start"]
    command = f"python benchmarks/bench_soak.py --rounds {args.rounds} --sites {n}"
    rounds = [int(r["round"]) for r in rows]
    completed = len(codes) == 2 and all(code == 0 for code in codes)
    exact = rounds == list(range(1, args.rounds + 1)) and latest is not None and latest.endswith(
        f"{args.rounds:04d}.safetensors")
    q = max(1, len(rows) // 4)
    work = [float(r.get("time_send") or 0) + float(r.get("time_aggregate") or 0) + float(r.get("time_checkpoint") or 0)
            for r in rows]
    per_round = [float(r.get("round_seconds") or 0) for r in rows]
    work_first, work_last = sum(work[1:q + 1]) / q, sum(work[-q:]) / q
    a = quarters(series_rows, t0, t_restart, 1, half)
    b = quarters(series_rows, t_restart, t_end, half + 1, args.rounds) if len(codes) == 2 else (0.0, 0.0, 0.0, 0.0)
    bound = LOG_MAX_BYTES * LOG_KEEP + 64 * 1024  # + one oversized write at most
    logs_ok = all(v["files"] <= LOG_KEEP and v["bytes"] <= bound for v in logs.values())
    rotated = sum(1 for v in logs.values() if v["files"] > 1)
    load = f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}" + (f"; {args.note}" if args.note else "")
    wall = (t_end - t0) / 60
    plot(series_rows, t0, t_restart, PLOT)

    def pct(x, y):
        return round(100 * (y - x) / x, 1) if x else None

    print(f"rounds {len(rows)}/{args.rounds} ({n} sites), restart after {half}: runs exited {codes}; resumed exactly "
          f"{exact}; checkpoints kept {kept}; coordinator RSS {a[0]:.0f}->{a[1]:.0f} | {b[0]:.0f}->{b[1]:.0f} MB; "
          f"site RSS {a[2]:.0f}->{a[3]:.0f} | {b[2]:.0f}->{b[3]:.0f} MB; coordinator work/round {work_first:.3f} -> "
          f"{work_last:.3f} s (slope {slope_per_100(work):+.3f} s/100 rounds); round {slope_per_100(per_round):+.2f} "
          f"s/100 rounds; logs {logs}; wall {wall:.1f} min; {load}")
    common = {"command": command, "note": load, "rounds_reached": len(rows), "rounds_asked": args.rounds,
              "sites": n, "wall_min": round(wall, 1), "completed": completed}
    record_row("soak", f"resumed exactly after a coordinator restart at round {half}", int(exact), "bool",
               goal="rounds 1..N each once, latest checkpoint round N", met=exact and completed,
               checkpoints_kept=kept, **common)
    for who, i in (("coordinator", 0), ("site (mean of sites)", 2)):
        for seg, vals in (("before restart", a), ("after restart", b)):
            change = pct(vals[i], vals[i + 1])
            record_row("soak", f"{who} RSS change, first vs last quarter, {seg}", change, "%",
                       goal="within 10 %", met=None if change is None else abs(change) <= 10,
                       first_mb=round(vals[i], 1), last_mb=round(vals[i + 1], 1), **common)
    record_row("soak", "coordinator work per round (send+aggregate+checkpoint), slope", round(slope_per_100(work), 4),
               "s per 100 rounds", goal="independent of the round number", met=None,
               first_quarter_s=round(work_first, 4), last_quarter_s=round(work_last, 4),
               round_seconds_slope=round(slope_per_100(per_round), 3), **common)
    record_row("soak", "checkpoints kept (keep-checkpoints 5)", kept, "files", goal="<= 5", met=kept <= 5, **common)
    record_row("soak", "process logs bounded (64 KiB x 3 files for the soak)", rotated, "logs rotated",
               goal=f"every log <= {LOG_KEEP} files and <= {bound} bytes", met=logs_ok, logs=logs, **common)
    return 0 if completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
