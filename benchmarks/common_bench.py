"""Shared bits of the benchmarks: where the shared data is, what machine this is, how a result is recorded
(`record_row`: one JSON line per measurement in benchmarks/results/<bench>.jsonl)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"  # generated: benchmarks/make_results.py
RESULTS_DIR = REPO / "benchmarks" / "results"


def shared_data() -> Path | None:
    path = Path(os.environ.get("FEDRAD_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


def federated_run(sites: list[Path], overrides: dict[str, object], work: Path, name: str = "fed-run",
                  node_threads: int | None = 1, timeout: float = 3000) -> Path:
    """Real fedrad rounds, signed: SuperLink + one SuperNode per site folder + `flwr run`; the run folder.

    `overrides` is the run config (its run-dir is set here, under `work / name`); `name` keeps several runs in
    one `work`; `node_threads` is each SuperNode's torch threads (None: the node's default)."""
    from fedrad.client.runtime.site_runtime import SiteTrust
    from fedrad.deploy.processes import ProcessGroup, free_port, superlink_command, supernode_command, wait_for_port
    from fedrad.deploy.run_command import submit_run
    from fedrad.server.release import generate_keys

    run_dir = work / name
    sign_key, consortium_pub = generate_keys(work / "keys" / name)  # sites run only signed runs
    logs = work / "logs" / name
    with ProcessGroup() as group:
        port = free_port()
        state = work / "coordinator" / name
        state.mkdir(parents=True, exist_ok=True)
        link = group.start("superlink", superlink_command(state, "127.0.0.1", port), logs / "superlink.log")
        wait_for_port("127.0.0.1", port, 60, link)
        for site in sites:
            cfg = {"data-dir": str(site), "cache-dir": str(work / "cache" / site.name), "device": "cpu",
                   "state-dir": str(work / "state" / name / site.name)}
            if node_threads:
                cfg["threads"] = str(node_threads)
            group.start(f"node-{site.name}", supernode_command(f"127.0.0.1:{port}", free_port(), cfg,
                                                                 trust=SiteTrust(consortium_pub)),
                        logs / f"node-{site.name}.log")
        code = submit_run(f"127.0.0.1:{port}", {**overrides, "run-dir": str(run_dir)}, log_path=logs / "flwr-run.log",
                          timeout=timeout, echo=False, sign_key=sign_key)
    if code != 0 or not (run_dir / "global.safetensors").exists():
        raise RuntimeError(f"federated run failed (flwr exit {code}); see {logs}")
    return run_dir


def fedavg_in_process(model, sites: list, rounds: int, config_of_round, seed: int, after_round=None) -> list[float]:
    """FedAvg of `train_local` without Flower: per round each site trains a copy of the global `model` (in place)
    with `config_of_round(rnd)` and its own seed, then the example-weighted mean (float tensors, BatchNorm running
    statistics included; integer counters from the last site). `after_round(rnd)` runs after each mean. The
    sites' mean local loss per round."""
    import copy
    import dataclasses

    import numpy as np

    from fedrad.client.training.trainer import train_local

    losses = []
    for rnd in range(1, rounds + 1):
        states, counts, site_losses = [], [], []
        for node, data in enumerate(sites):
            local = copy.deepcopy(model)
            cfg = dataclasses.replace(config_of_round(rnd), seed=seed * 1_000_003 + rnd * 7919 + node)
            site_losses.append(float(np.mean(train_local(local, data, cfg, progress=False).losses)))
            states.append(local.state_dict())
            counts.append(len(data))
        model.load_state_dict({k: (sum(s[k] * n for s, n in zip(states, counts, strict=True)) / sum(counts)
                                   if states[0][k].is_floating_point() else states[-1][k]) for k in states[0]})
        losses.append(float(np.mean(site_losses)))
        if after_round is not None:
            after_round(rnd)
    return losses


def recipe_rounds(cfg, device: str = "cpu"):
    """`config_of_round` for `fedavg_in_process` from a RunConfig: each round's TrainConfig is the run's one
    recipe (fedrad.common.recipe) at that round's scheduled learning rate, as a site builds it in a real run."""
    from fedrad.client.training.trainer import TrainConfig

    return lambda rnd: TrainConfig.from_recipe(cfg, cfg.local_steps, device, cfg.round_lr(rnd))


def machine() -> str:
    """This machine, short: CPU model (cores); GPU name or "no GPU"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = " ".join(cpu.replace("(R)", "").replace("(TM)", "").replace(" CPU", "").split())
    return f"{cpu} ({os.cpu_count()} cores); {gpu}"


REQUIRED = ("bench", "date", "machine", "load", "command", "metric", "value", "unit", "goal", "met", "note")


def record_row(bench: str, metric: str, value, unit: str, *, command: str, goal: str | None = None,
               met: bool | None = None, note: str = "", results_dir: Path | None = None, **extra) -> dict:
    """Append one measurement as one JSON line to `<results_dir>/<bench>.jsonl` (default benchmarks/results) and
    return it. Fields: REQUIRED (date is UTC YYYY-MM-DD, machine is `machine()`, load the 1-min load average),
    then `extra`. One `write` on a file opened for append, so parallel benches do not interleave lines.
    benchmarks/make_results.py turns the rows into RESULTS.md."""
    if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
        raise TypeError(f"record_row: value of {bench}/{metric} must be a number or None, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        note, value = (f"{note}; " if note else "") + f"value was {value}", None
    row = {"bench": bench, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
           "load": round(os.getloadavg()[0], 2), "command": command, "metric": metric, "value": value,
           "unit": unit, "goal": goal, "met": met, "note": note}
    clash = set(extra) & set(row)
    if clash:
        raise TypeError(f"record_row: extra keys {sorted(clash)} clash with the row's fields")
    row.update(extra)
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(folder / f"{bench}.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
    return row


def bench_command(script: str, argv: list[str] | None = None) -> str:
    """The command that ran a bench, as a reader would retype it: `python benchmarks/<script's name> ARGS`
    (`argv` defaults to this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(shlex.quote(str(a)) for a in args)])
