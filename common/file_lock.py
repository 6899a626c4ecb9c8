"""One exclusive lock file shared by a site's processes and threads (POSIX `flock` on its own open file, so two
threads of one process exclude each other too); where `fcntl` does not exist, no lock (writes stay atomic)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created 0600) for the block; waits for whoever holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    fd = os.open(Path(path), os.O_CREAT | os.O_RDWR, 0o600)
    with open(fd, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
