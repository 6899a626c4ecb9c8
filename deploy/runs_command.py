"""`fedrad runs` and `fedrad stop RUN`: what the coordinator runs, and stopping one run.

Both go through Flower's own `flwr ls` / `flwr stop` (JSON output), with the same temporary Flower config
`fedrad run` writes (it names the coordinator and the consortium CA). `runs` joins Flower's list with
fedrad's run directories: run.json names the Flower run id, metrics.jsonl the last round and its losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.deploy.processes import flower_env, tool, with_default_port
from fedrad.deploy.run_command import _ca_from, write_flwr_home


class CoordinatorError(Exception):
    """Flower could not do what was asked at the coordinator; the message is Flower's own reason."""


def flwr_json(command: list[str], superlink: str, ca_cert: Path | None = None, timeout: float = 120.0
              ) -> dict[str, Any]:
    """`flwr COMMAND fedrad --format json` against `superlink`; its JSON reply, or CoordinatorError with the
    last paragraph of Flower's error message (the reason, without its "Using SuperLink ..." preamble)."""
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca_cert)
    try:
        out = subprocess.run([tool("flwr"), *command, "fedrad", "--format", "json"], capture_output=True,
                             text=True, env=flower_env({"FLWR_HOME": str(home)}), timeout=timeout,
                             start_new_session=True)
    except subprocess.TimeoutExpired:
        raise CoordinatorError(f"no answer from {superlink} in {timeout:.0f} s") from None
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = out.stdout
    try:
        reply = json.loads(text[text.index("{"):])
    except ValueError:
        last = (out.stderr or out.stdout).strip().splitlines()
        raise CoordinatorError(last[-1] if last else f"flwr exited with {out.returncode}") from None
    if not reply.get("success"):
        message = str(reply.get("error-message") or "unknown error")
        raise CoordinatorError(" ".join(message.strip().split("\n\n")[-1].split()))
    return reply


@dataclass(frozen=True)
class Progress:
    """A run directory's state as metrics.jsonl and run.json tell it."""

    run_dir: Path
    rounds_done: int
    rounds_planned: int | None
    train_loss: float | None
    eval_loss: float | None


def run_directories(runs_dir: Path) -> dict[str, Path]:
    """Flower run id -> fedrad run directory, for RUNS_DIR itself and each folder in it holding a run.json.

    A resumed run directory names its latest Flower run id (the ServerApp rewrites run.json).
    """
    found: dict[str, Path] = {}
    candidates = [runs_dir, *sorted(p for p in runs_dir.iterdir() if p.is_dir())] if runs_dir.is_dir() else []
    for folder in candidates:
        try:
            run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and run.get("run_id") is not None:
            found[str(run["run_id"])] = folder
    return found


def progress(run_dir: Path) -> Progress:
    """Rounds done (metrics.jsonl), rounds planned (run.json's config) and the last round's losses."""
    from fedrad.server.run_log import read_metrics

    rows = read_metrics(run_dir)
    planned = None
    try:
        config = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("config") or {}
        planned = int(config["num-server-rounds"]) if "num-server-rounds" in config else None
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    last = rows[-1] if rows else {}
    return Progress(run_dir, int(last.get("round", 0)), planned, _number(last.get("train_loss")),
                    _number(last.get("eval_loss")))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def runs_table(runs: list[dict[str, Any]], dirs: dict[str, Path]) -> str:
    """One line per Flower run: id, status, round done/planned, last train and held-out loss, run directory."""
    header = ("RUN", "STATUS", "ROUND", "TRAIN LOSS", "HELD-OUT LOSS", "ELAPSED", "RUN DIR")
    lines = [header]
    for run in runs:
        run_id = str(run.get("run-id"))
        folder = dirs.get(run_id)
        try:
            p = progress(folder) if folder else None
        except OSError:  # a run directory this user cannot read: Flower's columns still say enough
            p = None
        rnd = "-" if p is None else f"{p.rounds_done}/{p.rounds_planned if p.rounds_planned else '?'}"
        lines.append((run_id, str(run.get("status") or "?"), rnd,
                      _fmt(p.train_loss if p else None), _fmt(p.eval_loss if p else None),
                      str(run.get("elapsed") or "-"), str(folder) if folder else "- (not under --runs-dir)"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def parse_run_id(text: str) -> int:
    """A Flower run id as `fedrad runs` lists it (a positive whole number); ValueError (exit 2) otherwise."""
    if not text.strip().isdigit() or int(text) == 0:
        raise ValueError(f"RUN {text!r} is not a Flower run id (a number, as `fedrad runs` lists it)")
    return int(text)


def cmd_runs(args) -> int:
    superlink = with_default_port(args.superlink)
    ca = _ca_from(args.certs)
    runs_dir = Path(args.runs_dir).resolve()
    try:
        reply = flwr_json(["ls"], superlink, ca)
    except CoordinatorError as exc:
        print(f"fedrad runs: {superlink}: {exc}", file=sys.stderr, flush=True)
        return 1
    runs = sorted(reply.get("runs") or [], key=lambda r: str(r.get("pending-at") or ""))
    if not runs:
        print(f"fedrad runs: no runs on the coordinator at {superlink}")
        return 0
    print(runs_table(runs, run_directories(runs_dir)))
    return 0


def cmd_stop(args) -> int:
    run_id = parse_run_id(args.run)
    superlink = with_default_port(args.superlink)
    ca = _ca_from(args.certs)
    try:
        runs = {str(r.get("run-id")): r for r in flwr_json(["ls"], superlink, ca).get("runs") or []}
        if str(run_id) not in runs:
            raise ValueError(f"RUN {run_id}: no such run on the coordinator at {superlink} (see `fedrad runs`)")
        status = str(runs[str(run_id)].get("status") or "")
        if status.startswith("finished"):
            print(f"fedrad stop: run {run_id} has already finished ({status}); nothing to stop")
            return 0
        flwr_json(["stop", str(run_id)], superlink, ca)
    except CoordinatorError as exc:
        print(f"fedrad stop: {superlink}: could not stop run {run_id}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"fedrad stop: run {run_id} stopped on the coordinator at {superlink}")
    return 0


__all__ = ["CoordinatorError", "Progress", "cmd_runs", "cmd_stop", "flwr_json", "parse_run_id", "progress",
           "run_directories", "runs_table"]
