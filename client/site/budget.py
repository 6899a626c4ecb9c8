"""The site's image-level privacy budget (run-config `dp = "sample"`): one object owns plan, record and check.

The ledger (`dp_sample_ledger.json` in the site's state folder) holds ONE ENTRY PER TRAINING MESSAGE, keyed
by what the site itself saw: the Flower run id and message id of the message, and a key derived from the
consortium-signed statement of the run (`statement_key`). The coordinator's unsigned `run-key` is stored as a
label only; it never selects or replaces anything. Every change happens under the state's file lock on a
copy read under that same lock, and changes exactly one entry:

- `plan` (before training): the site's ε over EVERY entry plus this message's planned steps is checked
  against the limit; if it fits, a "planned" entry is appended. A crash after this over-counts, never under.
- `record` (after training, before the weights leave): that entry's steps are replaced by the steps taken.

So two runs in flight with the same run-key (a retired worker, a fresh process per message, a replay) each
append their own entries; neither can write over the other's rounds. RDP composes across all entries (the
same images), so the site's ε is that of the concatenated histories (`spent`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.client.site.ledger_file import LEDGER_FORMAT, BudgetError, read_ledger
from fedrad.client.site.site_state import SiteState, locked
from fedrad.common.atomic import PRIVATE_FILE, atomic_write_bytes

Step = tuple[float, float, int]  # opacus RDP history item: (noise multiplier, sample rate, steps)


def _steps(raw: Any) -> list[Step]:
    return [(float(s), float(q), int(n)) for s, q, n in (raw or [])]


def ledger_history(data: dict[str, Any]) -> list[Step]:
    """Every step the ledger holds: legacy per-run histories (format 2), then every entry in order."""
    legacy = [h for key in sorted(data["runs"]) for h in _steps((data["runs"][key] or {}).get("history"))]
    return legacy + [h for entry in data["entries"].values() for h in _steps(entry.get("history"))]


def epsilon_of(history: list[Step], delta: float) -> float:
    """ε at `delta` of the composed sampled-Gaussian steps (opacus RDP). Steps with the same (σ, q) are
    summed first: RDP adds up, so this is exact and costs one term per distinct (σ, q), not per round."""
    from opacus.accountants import RDPAccountant

    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(n)
    if not any(merged.values()):
        return 0.0
    acc = RDPAccountant()
    acc.history = [(s, q, n) for (s, q), n in merged.items() if n > 0]
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class Planned:
    """A planned entry: `entry_id` names it for `record`; `epsilon` is the site's ε with it counted."""

    entry_id: str
    epsilon: float


@dataclass(frozen=True)
class OverBudget:
    """`plan` refused: the site's ε with this message's steps would be `epsilon` > `limit`."""

    epsilon: float
    limit: float


class SiteBudget:
    """The site's ε budget over all runs, at `delta`, with `limit` (0: none). Stateless between calls: every
    call reads the ledger under the lock, so any number of processes may hold one."""

    def __init__(self, state: SiteState, delta: float, limit: float = 0.0) -> None:
        self.state, self.delta, self.limit = state, float(delta), float(limit)

    @property
    def path(self) -> Path:
        return self.state.ledger

    def spent(self) -> float:
        """The site's image-level ε at `delta` over every entry of the ledger."""
        return epsilon_of(ledger_history(read_ledger(self.path)), self.delta)

    def check(self, steps: list[Step]) -> float:
        """The site's ε if `steps` were added now (nothing is written)."""
        return epsilon_of(ledger_history(read_ledger(self.path)) + list(steps), self.delta)

    def plan(self, steps: list[Step], *, flower_run_id: int, message_id: str, statement: str,
             run_key: str = "", server_round: int = 0) -> Planned | OverBudget:
        """Check `steps` against the limit and, when they fit, append a planned entry, in one locked step."""
        with locked(self.state):
            data = read_ledger(self.path)
            eps = epsilon_of(ledger_history(data) + list(steps), self.delta)
            if self.limit > 0 and eps > self.limit:
                return OverBudget(eps, self.limit)
            entry_id = f"{int(flower_run_id)}/{message_id}/{uuid.uuid4().hex[:8]}"  # a re-sent message spends again
            data["entries"][entry_id] = {
                "flower_run_id": int(flower_run_id), "message_id": str(message_id), "statement": statement,
                "run_key": run_key, "server_round": int(server_round), "status": "planned",
                "history": [list(h) for h in steps], "planned": [list(h) for h in steps],
                "time": _utc()}
            self._write(data, eps)
        return Planned(entry_id, eps)

    def record(self, entry_id: str, steps: list[Step]) -> float:
        """Replace a planned entry's steps by the steps taken; returns the site's ε afterwards. Only that
        entry changes; an entry that vanished is appended again (never fewer steps than taken)."""
        with locked(self.state):
            data = read_ledger(self.path)
            entry = data["entries"].get(entry_id) or {"status": "planned", "lost_plan": True}
            entry.update({"status": "recorded", "history": [list(h) for h in steps], "time": _utc()})
            data["entries"][entry_id] = entry
            eps = epsilon_of(ledger_history(data), self.delta)
            self._write(data, eps)
        return eps

    def _write(self, data: dict[str, Any], eps: float) -> None:
        data.update(format=LEDGER_FORMAT, site_epsilon=eps, site_delta=self.delta, updated=_utc())
        body = json.dumps(data, indent=1, sort_keys=False).encode("utf-8") + b"\n"
        atomic_write_bytes(self.path, body, mode=PRIVATE_FILE)  # run ids, rounds and times: the site's eyes only


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["LEDGER_FORMAT", "BudgetError", "OverBudget", "Planned", "SiteBudget", "Step", "epsilon_of",
           "ledger_history", "read_ledger"]
