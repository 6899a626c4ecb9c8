"""A run directory watched while the run goes on: metrics.jsonl read incrementally, the rest by mtime.

The dashboard (fedrad.deploy.dashboard) polls every few seconds for runs that last weeks; rereading a
metrics.jsonl of thousands of rounds each time would cost what the run itself writes, over and over. So
`MetricsTail` remembers the byte offset after the last complete line and reads only what was appended; a
line still being written waits for its newline. A resume rewrites the file (atomically: a new inode) to drop
a crashed round, and then the tail starts again from the top. Everything here only reads.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from fedrad.server.run_log import site_labels

MAX_READ = 8 << 20  # bytes read per poll at most: a huge file is caught up over several polls, memory bounded
SERIES = ("train_loss", "eval_loss", "alignment", "uniformity", "knn_auc", "probe_auc", "dp_epsilon")
SITE_SERIES = ("train_loss", "eval_loss", "alignment", "uniformity", "knn_auc", "probe_auc", "dp_epsilon",
               "num_examples")
TIMING = ("time_send", "time_site_compute_max", "time_wait", "time_aggregate", "time_checkpoint",
          "time_overhead", "round_seconds")
_ERROR_CODE = re.compile(r"error reply: code (\d+)")


class MetricsTail:
    """The rows of one metrics.jsonl, read incrementally (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.offset = 0
        self._inode: int | None = None

    def poll(self) -> bool:
        """Read what was appended since the last poll; True when the rows changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        changed = False
        if st.st_ino != self._inode or st.st_size < self.offset:  # a new file (resume rewrote it) or truncated
            self.rows, self.offset, self._inode, changed = [], 0, st.st_ino, True
        if st.st_size == self.offset:
            return changed
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(min(st.st_size - self.offset, MAX_READ))
        end = chunk.rfind(b"\n")
        if end < 0:
            if len(chunk) >= MAX_READ:  # one line larger than a whole read: not a metrics line, skip it
                self.offset += len(chunk)
            return changed
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash; resume drops its round
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                self.rows.append(row)
                changed = True
        self.offset += end + 1
        return changed


class JsonFile:
    """A small JSON file (run.json, summary.json) reread only when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self.value: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self.value = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp and st.st_size <= 4 << 20:
            try:
                value = json.loads(self.path.read_text(encoding="utf-8"))
                self.value = value if isinstance(value, dict) else None
            except (OSError, ValueError):
                self.value = None
            self._stamp = stamp
        return self.value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class RunWatch:
    """One run directory: its state for the runs page (`summary`) and its series for the run page (`detail`)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics = MetricsTail(self.run_dir / "metrics.jsonl")
        self.run = JsonFile(self.run_dir / "run.json")
        self.summary_file = JsonFile(self.run_dir / "summary.json")

    def poll(self) -> None:
        self.metrics.poll()
        self.run.poll()
        self.summary_file.poll()

    def summary(self, flower_status: str | None = None, now: float | None = None) -> dict[str, Any]:
        """Status, round, elapsed, sites answered/aggregated, last losses and ETA."""
        self.poll()
        now = time.time() if now is None else now
        run, done, rows = self.run.value or {}, self.summary_file.value, self.metrics.rows
        config = run.get("config") or {}
        planned = _int(config.get("num-server-rounds"))
        last = rows[-1] if rows else {}
        started = _number(run.get("started"))
        ended = _number(done.get("finished")) if done else None
        if flower_status:
            status = flower_status
        elif done:
            status = f"finished:{done.get('stopped') or 'completed'}"
        else:
            status = "running" if run else "starting"
        seconds = [s for s in (_number(r.get("round_seconds")) for r in rows[-5:]) if s is not None]
        remaining = (planned - int(last.get("round", 0))) if planned else None
        eta = (sum(seconds) / len(seconds) * remaining) if seconds and remaining and not done else None
        return {
            "name": self.run_dir.name, "run_id": str(run.get("run_id")) if run.get("run_id") is not None else None,
            "status": status, "round": int(last.get("round", 0)), "rounds_planned": planned,
            "started": started, "elapsed_seconds": ((ended or now) - started) if started else None,
            "eta_seconds": eta, "sites_answered": last.get("sites_answered"),
            "sites_aggregated": last.get("sites_aggregated"), "train_loss": _number(last.get("train_loss")),
            "eval_loss": _number(last.get("eval_loss")), "strategy": config.get("strategy"),
            "objective": config.get("objective"), "model": config.get("model"), "dp": config.get("dp"),
        }

    def detail(self, flower_status: str | None = None) -> dict[str, Any]:
        """Per-round and per-site series (named sites), the round-time split, screening, ε, files."""
        out = self.summary(flower_status)
        rows = self.metrics.rows
        labels = site_labels(rows)
        out["rounds"] = [int(r["round"]) for r in rows]
        out["series"] = {k: [_number(r.get(k)) for r in rows] for k in SERIES if any(k in r for r in rows)}
        out["timing"] = {k: [_number(r.get(k)) for r in rows] for k in TIMING if any(k in r for r in rows)}
        sites: dict[str, dict[str, list]] = {}
        screening, epsilon = [], {}
        for r in rows:
            rnd = int(r["round"])
            for node, record in (r.get("sites") or {}).items():
                if not isinstance(record, dict):
                    continue
                per = sites.setdefault(labels.get(str(node), str(node)), {})
                for key in SITE_SERIES:
                    if _number(record.get(key)) is not None:
                        per.setdefault(key, []).append([rnd, _number(record[key])])
                if _number(record.get("dp_epsilon")) is not None:
                    epsilon[labels.get(str(node), str(node))] = _number(record["dp_epsilon"])
            for action in ("rejected", "capped"):
                for node, reason in (r.get(action) or {}).items():
                    code = _ERROR_CODE.search(str(reason))
                    screening.append({"round": rnd, "site": labels.get(str(node), f"node {node}"), "action": action,
                                      "code": int(code.group(1)) if code else None, "reason": str(reason)[:300]})
        out.update(sites=sites, screening=screening, epsilon=epsilon, checkpoints=self._checkpoints(),
                   releases=self._releases(), site_names=sorted(sites))
        return out

    def _checkpoints(self) -> list[dict[str, Any]]:
        folder = self.run_dir / "checkpoints"
        try:
            files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
        except OSError:
            return []
        return [{"name": p.name, "bytes": p.stat().st_size, "time": p.stat().st_mtime} for p in files[-20:]]

    def _releases(self) -> list[dict[str, Any]]:
        """Release bundles written from this run (folders in the run directory holding a manifest.json)."""
        found = []
        try:
            folders = sorted(p for p in self.run_dir.iterdir() if p.is_dir())
        except OSError:
            return []
        for folder in folders:
            manifest = JsonFile(folder / "manifest.json").poll()
            if manifest is not None:
                found.append({"folder": folder.name, "sequence": manifest.get("sequence"),
                              "created": manifest.get("created")})
        return found


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def site_activity(watches: list[RunWatch]) -> dict[str, dict[str, Any]]:
    """node id -> its enrolled name, the images it reported last, its last round, its rejections by code."""
    out: dict[str, dict[str, Any]] = {}
    for watch in watches:
        rows = watch.metrics.rows
        names = site_labels(rows)
        for r in rows:
            for node, record in (r.get("sites") or {}).items():
                entry = out.setdefault(str(node), {"name": None, "images_reported": None, "last_round": None,
                                                   "refusals": {}})
                if str(node) in (r.get("site_names") or {}):
                    entry["name"] = names.get(str(node))
                entry["label"] = names.get(str(node))
                if isinstance(record, dict) and _number(record.get("num_examples")) is not None:
                    entry["images_reported"] = int(record["num_examples"])
                entry["last_round"] = f"{watch.run_dir.name} round {r['round']}"
            for node, reason in (r.get("rejected") or {}).items():
                entry = out.setdefault(str(node), {"name": None, "images_reported": None, "last_round": None,
                                                   "refusals": {}})
                code = _ERROR_CODE.search(str(reason))
                key = f"code {code.group(1)}" if code else str(reason).split(":")[0][:60]
                entry["refusals"][key] = entry["refusals"].get(key, 0) + 1
    return out


__all__ = ["MAX_READ", "JsonFile", "MetricsTail", "RunWatch", "site_activity"]
