"""Warm worker memory: the RSS of one site's warm worker process across many small rounds must not grow.

A real SuperLink and one SuperNode on loopback (fedrad's runtime, warm worker per run) run `--rounds` small
rounds with eval-in-train. A sampler reads the worker's RSS (psutil) after every round's line lands in
metrics.jsonl. Printed and recorded: RSS after round 1, after round `--settle`, at the end and
the peak, and the growth from round `--settle` to the end (the first rounds import, decode and allocate).
Then, with the run over and the worker idle (alive, waiting for a next round), its RSS / PSS / USS / anonymous
memory (benchmarks/memory_split.py), for each `--idle-release` setting (node-config idle-release: the worker lets
go of its model and image maps after each message, or keeps them), against fresh interpreters that only import
what the worker imports: the difference is what the worker holds beyond its imports.
Rows go to benchmarks/results/worker_memory.jsonl.
Run: python benchmarks/bench_worker_memory.py [--rounds 50] [--idle-release on,off]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import common_bench  # noqa: E402
from memory_split import MIB, import_ladder, mib, smaps  # noqa: E402

SMALL = {"model": "test_resnet", "image-size": 32, "local-steps": 3, "batch-size": 8, "proj-dim": 32,
         "fraction-evaluate": 0.0, "eval-in-train": True, "objective": "simclr"}
WORKER_STARTED = re.compile(r"warm worker (\d+) started for run (\d+)")
BENCH = "worker_memory"


def record_row(metric: str, value, unit: str, **fields) -> None:
    """One measurement, one JSON line in benchmarks/results/worker_memory.jsonl."""
    common_bench.record_row("worker_memory", metric, value, unit, **fields)


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


def one_run(rounds: int, idle_release: str) -> tuple[dict[int, int], dict[str, int], float, int]:
    """({round: worker RSS}, the idle worker's smaps numbers after the run, wall seconds, exit code)."""
    from federation_harness import Consortium

    from fedrad.deploy.synthetic import write_synthetic_sites

    rss: dict[int, int] = {}
    idle: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (site,) = write_synthetic_sites(tmp / "sites", n_sites=1, patients_per_site=20, size=128)
        c = Consortium(tmp / "fed")
        stop = threading.Event()
        run_dir = tmp / "fed" / "run"
        log = tmp / "fed" / "logs" / "node-s0.log"
        sampler = threading.Thread(target=sample_rss, args=(log, run_dir, stop, rss))
        t0 = time.perf_counter()
        code = 1
        try:
            c.start_link()
            c.start_node("s0", site, config={"threads": 1, "idle-release": idle_release})
            sampler.start()
            code = c.run(dict(SMALL, **{"num-server-rounds": rounds, "run-dir": str(run_dir),
                                        "min-train-nodes": 1, "min-available-nodes": 1}), timeout=3600)
            time.sleep(3)  # the worker is idle now: the run is over, it waits for a next message
            pid = _worker_pid(log)
            idle = smaps(pid) if pid else {}
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
            c.stop()
        wall = time.perf_counter() - t0
    return rss, idle, wall, code


_RELEASE_PROBE = """
import json, os, sys
sys.path.insert(0, {here!r})
import torch
from memory_split import smaps
from fedrad.client.app import task
from fedrad.common.models import build_model
torch.set_num_threads(1)
name = {name!r}
model = build_model(name, "simclr", 64, proj_dim=128)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(2):  # a local round's state: weights and their gradients (the optimizer is dropped after a round)
    out = model(torch.rand(8, 1, 64, 64))
    loss = (out[0] if isinstance(out, tuple) else out).float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
del opt, loss, out
task._RESIDENT["model"] = (("probe", name), model)
params = sum(p.numel() for p in model.parameters())
del model
import ctypes, gc
gc.collect()  # what the runtime does after every message anyway (runtime._release_memory): not counted here
ctypes.CDLL("libc.so.6").malloc_trim(0)
task.release_idle()  # measured around this call
"""


def release_by_model(name: str) -> dict:
    """What release_idle frees in a worker holding a trained `name` (weights + gradients), fresh interpreter."""
    code = _RELEASE_PROBE.format(here=str(Path(__file__).parent), name=name).replace(
        "task.release_idle()  # measured", "before = smaps(os.getpid())\ntask.release_idle()  # measured") + (
        "after = smaps(os.getpid())\nprint(json.dumps({'params': params, 'before': before, 'after': after}))\n")
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-400:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--settle", type=int, default=5, help="growth is measured from this round on")
    ap.add_argument("--idle-release", default="on,off", help="node-config idle-release settings to run, in order")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the rows)")
    ap.add_argument("--release-models", default="", help="also: what idle release frees in a worker holding "
                    "these trained models (comma separated, e.g. resnet18,resnet50); alone with --rounds 0")
    args = ap.parse_args()
    command = (f"python benchmarks/bench_worker_memory.py --rounds {args.rounds} --settle {args.settle} "
               f"--idle-release {args.idle_release}" + (f" --release-models {args.release_models}"
                                                         if args.release_models else ""))
    for name in filter(None, args.release_models.split(",")):
        r = release_by_model(name)
        freed = (r["before"]["anon"] - r["after"]["anon"]) / MIB
        weights = r["params"] * 4 / MIB
        print(f"{name}: idle release frees {freed:.0f} MiB anonymous memory ({weights:.0f} MiB of fp32 weights, "
              f"+ gradients); worker USS {r['before']['uss'] / MIB:.0f} -> {r['after']['uss'] / MIB:.0f} MiB")
        record_row(f"idle release frees (trained {name} resident, 64 px)", round(freed, 1), "MiB", command=command,
                   note=f"fresh interpreter; load avg {os.getloadavg()[0]:.1f}"
                   + (f"; {args.note}" if args.note else ""),
                   model=name, weights_mib=round(weights, 1), before=mib(r["before"]), after=mib(r["after"]))
    if args.rounds <= 0:
        return 0
    ladder = import_ladder()
    imports = ladder["worker after a message"]
    print("imports only (fresh interpreter): " + "; ".join(
        f"{k}: USS {v['uss'] / MIB:.0f} anon {v['anon'] / MIB:.0f} RSS {v['rss'] / MIB:.0f} MiB"
        for k, v in ladder.items()))
    for step, numbers in ladder.items():
        record_row(f"imports-only USS: {step}", round(numbers["uss"] / MIB, 1), "MiB", command=command, note=args.note,
                   step=step, numbers=mib(numbers), modules=numbers["modules"], torch=numbers["torch"],
                   timm=numbers["timm"])
    for setting in args.idle_release.split(","):
        load_start = os.getloadavg()[0]
        rss, idle, wall, code = one_run(args.rounds, setting)
        if code != 0 or not rss or not idle:
            print(f"run failed (exit {code}) or no worker memory sampled", file=sys.stderr)
            return 1
        rounds = sorted(rss)
        settle = min((r for r in rounds if r >= args.settle), default=rounds[0])
        first, settled, last, peak = rss[rounds[0]], rss[settle], rss[rounds[-1]], max(rss.values())
        growth = last - settled
        beyond = idle["uss"] - imports["uss"]
        note = (f"idle-release {setting}; load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                "cores" + (f"; {args.note}" if args.note else ""))
        print(f"idle-release {setting}: worker RSS MiB: round {rounds[0]} {first / MIB:.1f}, round {settle} "
              f"{settled / MIB:.1f}, round {rounds[-1]} {last / MIB:.1f}, peak {peak / MIB:.1f}; growth "
              f"{settle}->{rounds[-1]}: {growth / MIB:+.1f} MiB; idle after the run: "
              + ", ".join(f"{k} {v / MIB:.1f}" for k, v in idle.items())
              + f" MiB; beyond imports: USS {beyond / MIB:+.1f}, anonymous "
              f"{(idle['anon'] - imports['anon']) / MIB:+.1f} MiB; {len(rounds)} samples, {wall:.0f} s")
        extra = {"idle_release": setting, "rounds": rounds[-1]}
        record_row("worker RSS growth from the settled round to the end", round(growth / MIB, 1), "MiB",
                   command=command, goal="no growth across rounds", met=growth / MIB <= 5.0, note=note,
                   rss_first=round(first / MIB, 1), rss_settled=round(settled / MIB, 1), settle_round=settle,
                   rss_end=round(last / MIB, 1), rss_peak=round(peak / MIB, 1), wall_s=round(wall), **extra)
        record_row("idle worker USS (run over, worker alive)", round(idle["uss"] / MIB, 1), "MiB", command=command,
                   note=note, idle=mib(idle), imports_only=mib(imports), **extra)
        record_row("idle worker USS beyond its imports (idle USS - imports-only USS)", round(beyond / MIB, 1),
                   "MiB", command=command, note=note + "; USS counts library pages no other process maps, so it "
                   "depends on what else runs: compare anonymous memory (next row)", **extra)
        record_row("idle worker anonymous memory beyond its imports (heap, Python objects, tensors)",
                   round((idle["anon"] - imports["anon"]) / MIB, 1), "MiB", command=command, note=note, **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
