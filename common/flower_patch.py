"""The one Flower release whose internals fedrad changes, and how a patched Flower entry point is run.

fedrad reaches into a few Flower internals where Flower has no option (the SuperNode's poll loop:
client/runtime/node_poll.py; the SuperLink's SQLite lock wait: deploy/superlink_entry.py). Each was read in
PATCHED_FLWR; on another release the patch is skipped and Flower runs as it ships (its own timing), never half
patched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

PATCHED_FLWR = "1.41.0"  # pyproject pins flwr to this release


def flower_is_patched_release() -> bool:
    """Is the installed Flower the release whose internals fedrad's patches were written against?"""
    from importlib.metadata import version

    return version("flwr") == PATCHED_FLWR


def run_flower_entry(name: str, entry: Callable[[], int | None]) -> int:
    """Run Flower's console entry `entry` as the command `name` (its usage and log lines name it)."""
    sys.argv[0] = name
    return entry() or 0
