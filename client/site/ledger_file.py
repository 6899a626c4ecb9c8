"""The DP ledger file's format and its one reader: below both the budget (which writes it) and the site state
(which checks it parses when the site starts), so neither imports the other for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LEDGER_FORMAT = 3


class BudgetError(ValueError):
    """The ledger is unreadable or not a ledger: refuse rather than restart ε at 0. The text names the file."""


def read_ledger(path: Path) -> dict[str, Any]:
    """The ledger as a dict (empty when absent). Format 2 (one history per run-key) is read as legacy
    histories that still count; BudgetError when the file is unreadable or not a ledger."""
    if not path.is_file():
        return {"format": LEDGER_FORMAT, "entries": {}, "runs": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BudgetError(f"{path}: the site's DP ledger is unreadable ({exc}); restore it from backup or "
                          "move it away knowingly (its epsilon would restart at 0)") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs", {}), dict) or \
            not isinstance(data.get("entries", {}), dict) or ("runs" not in data and "entries" not in data):
        raise BudgetError(f"{path}: not a fedrad DP ledger (no 'entries' or 'runs' table)")
    data.setdefault("entries", {})
    data.setdefault("runs", {})
    return data

