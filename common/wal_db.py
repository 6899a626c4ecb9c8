"""Open a site's SQLite (WAL) file safely when several processes or threads open it at once.

SQLite answers "database is locked" at once, without waiting its busy timeout, when two connections switch a new
file to WAL together (each holds a shared lock and wants the exclusive one: a deadlock SQLite refuses to wait on).
Two messages of one site loading its image store together hit it (CI, test_site_budget). So the first steps of
every open (create the file 0600, WAL, schema) run under an exclusive `flock` of a sibling `<name>.open-lock`;
after that WAL readers and writers wait on each other through the busy timeout as usual.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from fedrad.common.file_lock import exclusive_lock

BUSY_TIMEOUT_S = 600  # a writer waits this long for another (a batch commit of a big store takes seconds)


def open_wal(path: Path, schema: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to `path` (made 0600 if new; its WAL/SHM files inherit that) in WAL mode with `schema` applied.
    Autocommit (callers BEGIN IMMEDIATE themselves); usable from the threads of the store that owns it."""
    path = Path(path)
    with exclusive_lock(path.with_name(path.name + ".open-lock")):
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")  # WAL + NORMAL: a kill loses nothing committed
            db.executescript(schema)
        except BaseException:
            db.close()
            raise
    return db
