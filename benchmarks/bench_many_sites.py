"""Many sites: a loopback consortium of N sites (real SuperLink, real SuperNodes through fedrad's site runtime,
tiny model), one run without and one with SecAgg+, for each N in --sites.

Reported per N and mode, from metrics.jsonl (rounds 2+ mean; round 1 also decodes the caches and starts the
warm workers), where a round's seconds go: the slowest site's own handler seconds (`compute`), the time the
coordinator spends sending, waiting beyond the slowest site's compute, aggregating and checkpointing, and the fixed
overhead (round - compute). CPU seconds per round of the sites' process trees and the coordinator's (SuperLink +
ServerApp), against the 2 cores' capacity (cores x round wall): with many sites on few cores, "overhead" is
mostly the sites queueing for CPU, and this says so. Memory (benchmarks/memory_split.py): the peak RSS of each
site's tree (runtime + SuperNode + warm worker) sampled every 0.5 s, and 5 s after the run (the worker still
alive, idle) each process kind's RSS / PSS / USS / anonymous memory; the sum of all sites' PSS is what N sites
really take (shared library pages counted once), the machine's MemAvailable drop its cross-check.
Rows go to benchmarks/results/many_sites.jsonl (one JSON object per measurement).
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
import common_bench  # noqa: E402
from memory_split import MIB, mib, tree, tree_cpu_by_kind, tree_cpu_seconds, tree_split  # noqa: E402

from fedrad.client.runtime.poll_timing import FAST_POLL_WINDOW_SECONDS  # noqa: E402

BENCH = "many_sites"
TINY = {"model": "test_resnet", "image-size": 32, "local-steps": 5, "batch-size": 8, "proj-dim": 32,
        "objective": "simclr", "fraction-evaluate": 0.0, "eval-in-train": True}
IDLE_CPU_SECONDS = 10.0  # after the run: CPU seconds per second of the idle sites and coordinator over this long
TIMED = ("round_seconds", "time_site_compute_max", "time_send", "time_wait", "time_aggregate", "time_checkpoint",
         "time_train", "time_overhead")


def record_row(metric: str, value, unit: str, **fields) -> None:
    """One measurement, one JSON line in benchmarks/results/many_sites.jsonl."""
    common_bench.record_row("many_sites", metric, value, unit, **fields)


def tree_rss(pid: int) -> int:
    """RSS bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peak tree RSS per named process, the machine's lowest MemAvailable and the highest 1-min load; and each
    tree's CPU seconds when a round ends (a new line in `metrics`), so rounds 2+ get their own CPU account."""

    def __init__(self, pids: dict[str, int], metrics: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak = pids, dict.fromkeys(pids, 0)
        self.low_available, self.high_load = mem_available(), os.getloadavg()[0]
        self.metrics, self.rounds_seen = metrics, 0
        self.round_cpu: list[dict[str, float]] = []  # per finished round: CPU seconds of each tree so far
        self.done = threading.Event()

    def _round_ended(self) -> bool:
        if self.metrics is None or not self.metrics.exists():
            return False
        lines = sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
        ended, self.rounds_seen = lines > self.rounds_seen, max(lines, self.rounds_seen)
        return ended

    def run(self) -> None:
        while not self.done.is_set():
            if self._round_ended():
                self.round_cpu.append({name: tree_cpu_seconds(pid) for name, pid in self.pids.items()})
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_rss(pid))
            self.low_available = min(self.low_available, mem_available())
            self.high_load = max(self.high_load, os.getloadavg()[0])
            self.done.wait(0.5)


def consortium_run(sites: list[Path], work: Path, rounds: int, secagg: bool, idle_release: bool) -> dict:
    from federation_harness import Consortium

    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.server.run_log import read_metrics

    n = len(sites)
    available_before = mem_available()
    c = Consortium(work)
    try:
        c.start_link()
        for i, site in enumerate(sites):
            c.start_node(f"s{i}", site, trust=SiteTrust(consortium_key=c.consortium_pub),
                         config={"threads": 1, "idle-release": "on" if idle_release else "off"})
        cfg = dict(TINY, **{"num-server-rounds": rounds, "run-dir": str(work / "run"), "round-timeout": 3600.0,
                            "min-train-nodes": n, "min-available-nodes": n})
        if secagg:
            cfg.update({"secagg": True, "secagg-shares": min(n, 3), "secagg-threshold": 2})
        pids = {name: proc.pid for name, proc in c.nodes.items()}
        pids["coordinator"] = c.link.pid
        sampler = Sampler(pids, work / "run" / "metrics.jsonl")
        sampler.start()
        cpu0 = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.perf_counter()
        code = c.run(cfg, timeout=3600)
        wall = time.perf_counter() - t0
        cpu = {name: tree_cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        sampler.done.set()
        sampler.join()
        if code != 0:
            raise RuntimeError(f"federated run failed; see {work / 'logs'}")
        time.sleep(5)
        site_names = [k for k in pids if k != "coordinator"]
        idle = {name: tree_split(pid) for name, pid in pids.items()}
        # idle CPU: what N waiting sites (SuperNode polls, heartbeats) and the coordinator answering them cost,
        # once the sites' fast-poll window after their last message has passed (client/runtime/poll_timing.py)
        time.sleep(max(0.0, FAST_POLL_WINDOW_SECONDS + 2.0 - (time.perf_counter() - t0 - wall)))
        idle0, t_idle = {name: tree_cpu_by_kind(pid) for name, pid in pids.items()}, time.perf_counter()
        time.sleep(IDLE_CPU_SECONDS)
        idle_s = time.perf_counter() - t_idle
        idle_by = {name: {kind: (v - idle0[name].get(kind, 0.0)) / idle_s for kind, v in tree_cpu_by_kind(pid).items()}
                   for name, pid in pids.items()}  # cores busy, per tree and process kind
        idle_cpu = {name: sum(by.values()) for name, by in idle_by.items()}
        idle_kinds: dict[str, float] = {}  # summed over the sites
        for name in site_names:
            for kind, v in idle_by[name].items():
                idle_kinds[kind] = idle_kinds.get(kind, 0.0) + v
        rows = read_metrics(work / "run") if (work / "run" / "metrics.jsonl").exists() else []
        if not rows:  # the run ended without a round line: keep its logs, they leave with the temporary folder
            import shutil

            kept = Path(tempfile.gettempdir()) / f"many_sites_{n}_logs_{int(time.time())}"
            shutil.copytree(work / "logs", kept)
            raise RuntimeError(f"the run exited {code} without a round in metrics.jsonl; logs kept in {kept}")
        later = rows[1:] or rows
        split = {k: sum(float(r.get(k) or 0.0) for r in later) / len(later) for k in TIMED}
        snaps = sampler.round_cpu  # CPU of rounds 2+ alone: first round's end to the last round's end
        spent = {k: snaps[-1][k] - snaps[0][k] for k in pids} if len(snaps) >= 2 else {}
        per_later = max(1, len(snaps) - 1)
        kinds = sorted({k for s in site_names for k in idle[s]})
        idle_mean = {k: {f: sum(idle[s].get(k, {}).get(f, 0) for s in site_names) / n for f in ("rss", "pss", "uss",
                                                                                                 "anon")}
                     for k in kinds}
        return {"wall": wall, "round1": float(rows[0]["round_seconds"]), "rounds": len(rows), **split,
                "cpu_sites": sum(cpu[s] for s in site_names), "cpu_coord": cpu["coordinator"],
                "cpu_sites_later": sum(spent[s] for s in site_names) / per_later if spent else None,
                "cpu_coord_later": spent["coordinator"] / per_later if spent else None,
                "site_peak_mean": sum(sampler.peak[s] for s in site_names) / n / MIB,
                "site_peak_max": max(sampler.peak[s] for s in site_names) / MIB,
                "idle_by_kind": {k: mib(v) for k, v in idle_mean.items()},
                "sites_pss_idle_sum": sum(idle[s].get("total", {}).get("pss", 0) for s in site_names) / MIB,
                "sites_rss_idle_sum": sum(idle[s].get("total", {}).get("rss", 0) for s in site_names) / MIB,
                "coord_peak": sampler.peak["coordinator"] / MIB,
                "coord_idle": mib(idle["coordinator"].get("total", {})),
                "available_drop": (available_before - sampler.low_available) / MIB,
                "load_high": sampler.high_load,
                "idle_cpu_sites": sum(idle_cpu[s] for s in site_names), "idle_cpu_coord": idle_cpu["coordinator"],
                "idle_cpu_kinds": {k: round(v, 3) for k, v in sorted(idle_kinds.items())}}
    finally:
        c.stop()


def report(n: int, mode: str, r: dict, command: str, note: str, idle_release: bool) -> None:
    per_round = r["rounds"] or 1
    cores = os.cpu_count() or 1
    compute = r["time_site_compute_max"]
    beyond = max(r["time_wait"] - compute, 0.0)
    extra = {"sites": n, "mode": mode, "rounds": r["rounds"], "idle_release": idle_release,
             "load_high": round(r["load_high"], 1)}
    breakdown = {"round_1": round(r["round1"], 2), **{k: round(r[k], 2) for k in TIMED},
                 "wait_beyond_slowest_compute": round(beyond, 2)}
    cpu = {"sites_cpu_s_per_round": round(r["cpu_sites"] / per_round, 2),
           "coordinator_cpu_s_per_round": round(r["cpu_coord"] / per_round, 2),
           "cpu_capacity_s_per_round": round(cores * r["wall"] / per_round, 2), "run_wall_s": round(r["wall"], 1)}
    if r.get("cpu_sites_later") is not None:  # rounds 2+ alone (no start-up, no first decode)
        cpu.update(rounds_2plus_sites_cpu_s=round(r["cpu_sites_later"], 2),
                   rounds_2plus_coordinator_cpu_s=round(r["cpu_coord_later"], 2),
                   rounds_2plus_capacity_s=round(cores * r["round_seconds"], 2))
    print(f"{n:>3} sites {mode:>6}: round 1 {r['round1']:.2f} s, rounds 2+ {r['round_seconds']:.2f} s = compute "
          f"{compute:.2f} + overhead {r['time_overhead']:.2f} (send {r['time_send']:.2f}, wait beyond slowest "
          f"{beyond:.2f}, aggregate {r['time_aggregate']:.2f}, checkpoint {r['time_checkpoint']:.2f}); CPU s/round "
          f"sites {cpu['sites_cpu_s_per_round']:.1f} coordinator {cpu['coordinator_cpu_s_per_round']:.1f} of "
          f"{cpu['cpu_capacity_s_per_round']:.1f}"
          + (f"; rounds 2+ alone: sites {cpu['rounds_2plus_sites_cpu_s']:.1f} coordinator "
             f"{cpu['rounds_2plus_coordinator_cpu_s']:.1f} of {cpu['rounds_2plus_capacity_s']:.1f} CPU s a round"
             if "rounds_2plus_sites_cpu_s" in cpu else ""), flush=True)
    print(f"    site peak RSS {r['site_peak_mean']:.0f} (max {r['site_peak_max']:.0f}) MiB; idle per kind (mean MiB): "
          + "; ".join(f"{k} {v}" for k, v in r["idle_by_kind"].items())
          + f"; all sites idle: RSS sum {r['sites_rss_idle_sum']:.0f} MiB, PSS sum {r['sites_pss_idle_sum']:.0f} MiB;"
          f" MemAvailable drop {r['available_drop']:.0f} MiB; coordinator peak {r['coord_peak']:.0f} MiB; idle CPU: "
          f"sites {r['idle_cpu_sites']:.2f} cores {r['idle_cpu_kinds']}, coordinator {r['idle_cpu_coord']:.2f} cores",
          flush=True)
    common = dict(command=command, note=note, **extra)
    record_row("fixed overhead per round (rounds 2+ mean: round wall - slowest site's compute)",
               round(r["time_overhead"], 2), "s", goal="<= 5 s (round latency goal, demo)" if n <= 3 else None,
               met=(r["time_overhead"] <= 5.0) if n <= 3 else None, breakdown=breakdown, cpu=cpu, **common)
    record_row("round wall time (rounds 2+ mean)", round(r["round_seconds"], 2), "s", breakdown=breakdown, **common)
    record_row("coordinator CPU seconds per round", cpu["coordinator_cpu_s_per_round"], "s", cpu=cpu, **common)
    if "rounds_2plus_sites_cpu_s" in cpu:
        record_row("all sites' CPU seconds per round (rounds 2+; capacity = cores x round wall)",
                   cpu["rounds_2plus_sites_cpu_s"], "s", cpu=cpu, **common)
    record_row("site peak RSS (mean over sites; runtime + SuperNode + warm worker)", round(r["site_peak_mean"], 1),
               "MiB", peak_max=round(r["site_peak_max"], 1), **common)
    total = r["idle_by_kind"].get("total", {})
    record_row("site idle USS (mean over sites; private memory, what ending the site gives back)",
               total.get("uss"), "MiB", by_kind=r["idle_by_kind"], **common)
    record_row("site idle PSS (mean over sites; shared pages split)", total.get("pss"), "MiB",
               by_kind=r["idle_by_kind"], **common)
    record_row("idle CPU between runs: all sites (cores busy; SuperNode polls, heartbeats)",
               round(r["idle_cpu_sites"], 3), "cores", coordinator_cores=round(r["idle_cpu_coord"], 3),
               sites_by_kind=r["idle_cpu_kinds"], **common)
    record_row("all sites idle PSS sum", round(r["sites_pss_idle_sum"], 1), "MiB",
               rss_sum=round(r["sites_rss_idle_sum"], 1), mem_available_drop=round(r["available_drop"], 1),
               coordinator_idle=r["coord_idle"], coordinator_peak_rss=round(r["coord_peak"], 1), **common)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="3,10,20", help="consortium sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="plain,secagg")
    ap.add_argument("--idle-release", default="on", choices=["on", "off"], help="the sites' node-config idle-release")
    ap.add_argument("--site-mib", type=float, default=750.0, help="memory one site takes (PSS; raised to what a "
                    "smaller size measured) for the check that N sites fit before starting them")
    ap.add_argument("--coordinator-mib", type=float, default=1300.0, help="the coordinator's peak (raised likewise)")
    ap.add_argument("--margin-mib", type=float, default=2048.0, help="left free for the machine's other users")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the row)")
    args = ap.parse_args()
    from fedrad.deploy.synthetic import write_synthetic_sites

    command = (f"python benchmarks/bench_many_sites.py --sites {args.sites} --rounds {args.rounds} "
               f"--modes {args.modes} --idle-release {args.idle_release}")
    overhead: dict[tuple[int, str], float] = {}
    per_site, coordinator = args.site_mib, args.coordinator_mib
    for n in [int(s) for s in args.sites.split(",")]:
        for mode in args.modes.split(","):
            load_start = os.getloadavg()[0]
            need, have = n * per_site + coordinator + args.margin_mib, mem_available() / MIB
            if need > have:  # never push the shared machine into the OOM killer: say what stands in the way
                why = (f"not run: {n} sites need ~{need:.0f} MiB ({n} x {per_site:.0f} MiB per site (PSS, measured "
                       f"at the smaller size) + coordinator {coordinator:.0f} + margin {args.margin_mib:.0f}), the "
                       f"machine has {have:.0f} MiB available (load {load_start:.1f})")
                print(f"{n:>3} sites {mode:>6}: {why}", flush=True)
                record_row("fixed overhead per round (rounds 2+ mean: round wall - slowest site's compute)", None, "s",
                           command=command, note=why + (f"; {args.note}" if args.note else ""), sites=n, mode=mode,
                           need_mib=round(need), available_mib=round(have))
                continue
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir)
                sites = write_synthetic_sites(tmp / "sites", n_sites=n, patients_per_site=10, size=64)
                r = consortium_run(sites, tmp / "fed", args.rounds, mode == "secagg", args.idle_release == "on")
            note = (f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f} (max {r['load_high']:.1f}) on "
                    f"{os.cpu_count()} cores" + (f"; {args.note}" if args.note else ""))
            report(n, mode, r, command, note, args.idle_release == "on")
            per_site = max(per_site, r["sites_pss_idle_sum"] / n, r["site_peak_mean"] * 0.75)
            coordinator = max(coordinator, r["coord_peak"])
            overhead[(n, mode)] = r["time_overhead"]
    for mode in args.modes.split(","):
        small = min((n for n, m in overhead if m == mode), default=None)
        for n in sorted(n for n, m in overhead if m == mode and n != small):
            ratio = overhead[(n, mode)] / max(overhead[(small, mode)], 1e-9)
            print(f"{mode}: overhead at {n} sites / at {small} sites = {ratio:.2f}x")
            record_row(f"fixed overhead at {n} sites / at {small} sites", round(ratio, 2), "x", command=command,
                       goal="<= 2x (20 sites vs 3)" if (small, n) == (3, 20) else None,
                       met=(ratio <= 2.0) if (small, n) == (3, 20) else None, note=args.note, sites=n, mode=mode,
                       base_sites=small)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
