"""`fedrad runs` and `fedrad stop RUN`: what the coordinator runs, and stopping one run.

Both go through Flower's own `flwr ls` / `flwr stop` (JSON output), with the same temporary Flower config
`fedrad run` writes (it names the coordinator and the consortium CA). `runs` joins Flower's list with
fedrad's run directories: run.json names the Flower run id, metrics.jsonl the last round and its losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.deploy.flower_cli import RUN_FAILED_EXIT, CoordinatorError, ca_from, flwr_json, write_flwr_home
from fedrad.deploy.processes import flower_env, tool, with_default_port

PathLike = str | os.PathLike[str]
SUPERLINK = "127.0.0.1:8000"


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
                      hms(run.get("elapsed")), str(folder) if folder else "- (not under --runs-dir)"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in lines)


def hms(elapsed: Any) -> str:
    """Flower's elapsed seconds (27.952228) as H:MM:SS; a text Flower already formatted is kept."""
    if isinstance(elapsed, int | float) and not isinstance(elapsed, bool):
        seconds = int(round(elapsed))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return str(elapsed or "-")


def iso_time(text: Any) -> str | None:
    """Flower's "2026-12-06 07:04:46Z" (or "N/A") as ISO 8601 "2026-12-06T07:04:46Z" (or None)."""
    from datetime import UTC, datetime

    if not text or str(text).strip() in ("N/A", "-"):
        return None
    try:
        when = datetime.fromisoformat(str(text).strip().replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def runs_json(runs: list[dict[str, Any]], dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """`fedrad runs --format json`: one object per run, times in ISO 8601 (UTC), elapsed in seconds."""
    out = []
    for run in runs:
        run_id = str(run.get("run-id"))
        folder = dirs.get(run_id)
        try:
            p = progress(folder) if folder else None
        except OSError:
            p = None
        elapsed = run.get("elapsed")
        out.append({
            "run_id": run_id, "status": run.get("status"),
            "round": p.rounds_done if p else None, "rounds_planned": p.rounds_planned if p else None,
            "train_loss": p.train_loss if p else None, "eval_loss": p.eval_loss if p else None,
            "elapsed_seconds": float(elapsed) if isinstance(elapsed, int | float) else None,
            **{f"{key.replace('-', '_')}": iso_time(run.get(key))
               for key in ("pending-at", "starting-at", "running-at", "finished-at")},
            "run_dir": str(folder) if folder else None,
        })
    return out


EXIT_OF_STATUS = {"finished:completed": 0}  # any other finished:* (failed, stopped) -> RUN_FAILED_EXIT


def run_status(run_id: int, superlink: str, ca: Path | None) -> str:
    """The run's status at the coordinator ("running", "finished:completed", ...); ValueError when unknown."""
    runs = flwr_json(["ls", "--run-id", str(run_id)], superlink, ca).get("runs") or []
    if not runs:
        raise ValueError(f"RUN {run_id}: no such run on the coordinator at {superlink} (see `fedrad runs`)")
    return str(runs[0].get("status") or "")


def log_main(run: str, *, follow: bool = False, superlink: str = SUPERLINK, certs: PathLike | None = None) -> int:
    """`fedrad log RUN [--follow]`: the run's log from the coordinator (Flower's `flwr log`); with --follow it
    streams until the run ends and returns the run's status (0 completed, 1 failed or stopped)."""
    from fedrad.client.runtime.log_lines import ANSI

    run_id = parse_run_id(run)
    superlink = with_default_port(superlink)
    ca = ca_from(certs)
    try:
        status = run_status(run_id, superlink, ca)
    except CoordinatorError as exc:
        print(f"fedrad log: {superlink}: {exc}", file=sys.stderr, flush=True)
        return 1
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca)
    cmd = [tool("flwr"), "log", str(run_id), "fedrad", "--stream" if follow else "--show"]
    colour = sys.stdout.isatty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=flower_env({"FLWR_HOME": str(home)}), start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line.rstrip("\n") if colour else ANSI.sub("", line).rstrip("\n"), flush=True)
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        print(f"fedrad log: detached; run {run_id} goes on at the coordinator", file=sys.stderr, flush=True)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)
    if not follow:
        print(f"fedrad log: run {run_id} is {status}", file=sys.stderr, flush=True)
        return 0
    try:
        status = _final_status(run_id, superlink, ca)
    except CoordinatorError as exc:
        print(f"fedrad log: {superlink}: {exc}", file=sys.stderr, flush=True)
        return 1
    code = EXIT_OF_STATUS.get(status, RUN_FAILED_EXIT)
    print(f"fedrad log: run {run_id} ended {status} (exit {code})", file=sys.stderr, flush=True)
    return code


def _final_status(run_id: int, superlink: str, ca: Path | None, settle: float = 30.0) -> str:
    """Flower's stream ends when the run does; its status may lag a moment behind, so ask until it is final."""
    import time

    deadline = time.monotonic() + settle
    while True:
        status = run_status(run_id, superlink, ca)
        if status.startswith("finished:") or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def sites_rows(nodes: list[dict[str, Any]], runs_dir: Path) -> list[dict[str, Any]]:
    """The coordinator's nodes (Flower's list) with what fedrad's run directories say about each: its enrolled
    name, the images it reported last, its rejected updates by reason code."""
    from fedrad.server.run_log import read_metrics

    names: dict[str, str] = {}
    images: dict[str, int] = {}
    rejected: dict[str, dict[str, int]] = {}
    last_round: dict[str, str] = {}
    for folder in run_directories(runs_dir).values():
        try:
            rows = read_metrics(folder)
        except OSError:
            continue
        for row in rows:
            names.update({str(k): str(v) for k, v in (row.get("site_names") or {}).items()})
            for node, record in (row.get("sites") or {}).items():
                if isinstance(record, dict) and isinstance(record.get("num_examples"), int | float):
                    images[str(node)] = int(record["num_examples"])
                last_round[str(node)] = f"{folder.name} round {row.get('round')}"
            for node, reason in (row.get("rejected") or {}).items():
                counts = rejected.setdefault(str(node), {})
                counts[str(reason)] = counts.get(str(reason), 0) + 1
    out = []
    for node in nodes:
        node_id = str(node.get("node-id"))
        status = str(node.get("status") or "?")
        out.append({
            "node_id": node_id, "name": names.get(node_id), "status": status, "connected": status == "online",
            "enrolled_at": iso_time(node.get("created-at")), "online_at": iso_time(node.get("online-at")),
            "offline_at": iso_time(node.get("offline-at")),
            "last_seen": "now" if status == "online" else iso_time(node.get("offline-at")),
            "images_reported": images.get(node_id), "last_round": last_round.get(node_id),
            "rejected": rejected.get(node_id, {}),
        })
    return out


def sites_table(rows: list[dict[str, Any]]) -> str:
    header = ("SITE", "NODE ID", "STATUS", "LAST SEEN", "IMAGES", "REJECTED")
    lines = [header] + [(r["name"] or "-", r["node_id"], r["status"], str(r["last_seen"] or "-"),
                         "-" if r["images_reported"] is None else str(r["images_reported"]),
                         ", ".join(f"{k} x{v}" for k, v in r["rejected"].items()) or "-") for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)


def sites_main(*, superlink: str = SUPERLINK, certs: PathLike | None = None, runs_dir: PathLike = "runs",
               format: str = "table") -> int:
    """`fedrad sites`: the nodes enrolled at the coordinator, connected or not (Flower's `flwr supernode list`)."""
    superlink = with_default_port(superlink)
    ca = ca_from(certs)
    try:
        nodes = flwr_json(["supernode", "list"], superlink, ca).get("nodes") or []
    except CoordinatorError as exc:
        print(f"fedrad sites: {superlink}: {exc}", file=sys.stderr, flush=True)
        return 1
    rows = sites_rows(nodes, Path(runs_dir).resolve())
    if format == "json":
        print(json.dumps({"superlink": superlink, "sites": rows}, indent=1))
    elif not rows:
        print(f"fedrad sites: no site has joined the coordinator at {superlink}")
    else:
        print(sites_table(rows))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def parse_run_id(text: str) -> int:
    """A Flower run id as `fedrad runs` lists it (a positive whole number); ValueError (exit 2) otherwise."""
    if not text.strip().isdigit() or int(text) == 0:
        raise ValueError(f"RUN {text!r} is not a Flower run id (a number, as `fedrad runs` lists it)")
    return int(text)


def runs_main(*, superlink: str = SUPERLINK, certs: PathLike | None = None, runs_dir: PathLike = "runs",
              format: str = "table") -> int:
    """`fedrad runs`: the coordinator's runs joined with fedrad's run directories under `runs_dir` (a table, or
    JSON with ISO 8601 times); 1 when the coordinator cannot be asked."""
    superlink = with_default_port(superlink)
    ca = ca_from(certs)
    folder = Path(runs_dir).resolve()
    try:
        reply = flwr_json(["ls"], superlink, ca)
    except CoordinatorError as exc:
        print(f"fedrad runs: {superlink}: {exc}", file=sys.stderr, flush=True)
        return 1
    runs = sorted(reply.get("runs") or [], key=lambda r: str(r.get("pending-at") or ""))
    if format == "json":
        print(json.dumps({"superlink": superlink, "runs": runs_json(runs, run_directories(folder))}, indent=1))
        return 0
    if not runs:
        print(f"fedrad runs: no runs on the coordinator at {superlink}")
        return 0
    print(runs_table(runs, run_directories(folder)))
    return 0


def stop_main(run: str, *, superlink: str = SUPERLINK, certs: PathLike | None = None) -> int:
    """`fedrad stop RUN`: stop a run at the coordinator (a finished one is left as it is); 1 when it could not."""
    run_id = parse_run_id(run)
    superlink = with_default_port(superlink)
    ca = ca_from(certs)
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


__all__ = ["CoordinatorError", "Progress", "log_main", "runs_main", "sites_main", "stop_main", "hms", "iso_time",
           "run_status", "runs_json", "sites_rows", "sites_table", "flwr_json", "parse_run_id", "progress",
           "run_directories", "runs_table"]
