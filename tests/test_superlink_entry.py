"""The coordinator's SuperLink runs Flower's own entry point with a longer SQLite lock wait
(deploy/superlink_entry.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_superlink_runs_through_fedrad_entry_with_a_longer_sqlite_lock_wait():
    """The SuperLink fedrad starts waits BUSY_TIMEOUT_MS for SQLite's lock (Flower's 5 s dropped replies at 20
    sites), below the SuperNode's 30 s HTTP timeout; checked in a fresh interpreter as the process would run."""
    from fedrad.deploy.processes import superlink_command
    from fedrad.deploy.superlink_entry import BUSY_TIMEOUT_MS

    cmd = superlink_command(Path("state"), "127.0.0.1", 9092)
    assert cmd[:3] == [sys.executable, "-m", "fedrad.deploy.superlink_entry"]
    assert 5_000 < BUSY_TIMEOUT_MS < 30_000
    probe = ("from fedrad.deploy.superlink_entry import patch_busy_timeout as p; import flwr.supercore.sql_mixin "
             "as m; print(p(), dict(m.SQLITE_PRAGMAS)['busy_timeout'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", str(BUSY_TIMEOUT_MS)]
