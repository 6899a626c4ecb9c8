"""Open a site's SQLite (WAL) file safely when several processes or threads open it at once.

SQLite answers "database is locked" at once, without waiting its busy timeout, when two connections switch a new
file to WAL together (each holds a shared lock and wants the exclusive one: a deadlock SQLite refuses to wait on).
Two messages of one site loading its image store together hit it (CI, test_site_budget). So the first steps of
every open (create the file 0600, WAL, schema) run under an exclusive `flock` of a sibling `<name>.open-lock`;
after that WAL readers and writers wait on each other through the busy timeout as usual.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

BUSY_TIMEOUT_S = 600  # a writer waits this long for another (a batch commit of a big store takes seconds)


@contextlib.contextmanager
def _open_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock (the race stays, as it was)
        yield
        return
    fd = os.open(path.with_name(path.name + ".open-lock"), os.O_CREAT | os.O_RDWR, 0o600)
    with open(fd, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_wal(path: Path, schema: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to `path` (made 0600 if new; its WAL/SHM files inherit that) in WAL mode with `schema` applied.
    Autocommit (callers BEGIN IMMEDIATE themselves); usable from the threads of the store that owns it."""
    path = Path(path)
    with _open_lock(path):
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
