"""Size-bounded process logs: a text sink that rotates `name.log` -> `name.log.1` -> ... at a size limit.

Every log fedrad writes for a long-lived process (the SuperLink's, each SuperNode's with its site runtime, the
`flwr run` stream) goes through a `RotatingLog`: the process writes to a pipe, a pump thread copies its lines
here. A months-long run therefore holds at most `max_bytes * keep` bytes of each log, and the newest lines are
always in `name.log` (older ones in `.1`, `.2`, ... up to `.keep-1`; the oldest part is dropped).

Defaults: 50 MiB per file, 5 files in all. Environment: FEDRAD_LOG_MAX_BYTES (bytes per file, >= 1024) and
FEDRAD_LOG_KEEP (files in all, the current one included, >= 1). A bad value stops with one line naming it.
Where Python's logging writes a file itself, `rotating_handler` gives the same limits as a RotatingFileHandler.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from pathlib import Path

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_KEEP = 5
MIN_MAX_BYTES = 1024


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: must be at least {minimum}")
    return value


def log_limits() -> tuple[int, int]:
    """(bytes per file, files in all) from FEDRAD_LOG_MAX_BYTES / FEDRAD_LOG_KEEP, else the defaults."""
    return (_env_int("FEDRAD_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, MIN_MAX_BYTES),
            _env_int("FEDRAD_LOG_KEEP", DEFAULT_KEEP, 1))


def log_parts(path: Path) -> list[Path]:
    """The log's files that exist, newest first (`path`, `path.1`, ...)."""
    parts = [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, 1000)]
    out = []
    for part in parts:
        if not part.exists():
            break
        out.append(part)
    return out


class RotatingLog:
    """An append-only text sink (write / flush / close) whose file rotates before it would pass `max_bytes`.

    Rotation happens between writes, so a line written in one call is never split across two files (a single
    write larger than `max_bytes` goes whole into a fresh file). Thread-safe: one lock around each write."""

    def __init__(self, path: Path, max_bytes: int | None = None, keep: int | None = None) -> None:
        env_bytes, env_keep = log_limits()
        self.path = Path(path)
        self.max_bytes = int(max_bytes or env_bytes)
        self.keep = int(keep or env_keep)
        if self.max_bytes < 1 or self.keep < 1:
            raise ValueError(f"{self.path}: max_bytes and keep must be positive")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = open(self.path, "ab")  # noqa: SIM115  (held open for the process's lifetime; close() ends it)
        self._size = self._fh.tell()

    def write(self, text: str) -> int:
        data = text.encode("utf-8", errors="replace")
        with self._lock:
            if self._fh is None:
                return 0
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._fh.write(data)
            self._size += len(data)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    @property
    def closed(self) -> bool:
        return self._fh is None

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        name = self.path.name
        if self.keep == 1:
            self.path.unlink(missing_ok=True)
        else:
            self.path.with_name(f"{name}.{self.keep - 1}").unlink(missing_ok=True)
            for i in range(self.keep - 2, 0, -1):
                older = self.path.with_name(f"{name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{name}.1"))
        self._fh = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def __enter__(self) -> RotatingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rotating_handler(path: Path, max_bytes: int | None = None, keep: int | None = None) -> logging.Handler:
    """A logging handler writing `path` with the same limits (RotatingFileHandler's backups = keep - 1)."""
    env_bytes, env_keep = log_limits()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=int(max_bytes or env_bytes),
                                                backupCount=int(keep or env_keep) - 1, encoding="utf-8")
