"""Write files so that a crash never leaves a half-written one: write a temp file beside it, then rename.

The one implementation every module uses (checkpoints, cache index, salts, keys, manifests, JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (only readable by setting it; set straight back)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path` in one rename (same folder, same disk).

    `mode` is applied before anything is written, so a secret is never readable by others, not even
    for an instant. Without `mode` the file gets what `open()` would give it (0666 less the umask):
    `mkstemp` alone would make every output 0600, which hides plots and results from the people meant to read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        os.close(fd)
        writer(tmp_path)
        if mode is not None:
            os.chmod(tmp_path, mode)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode=mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700  # whatever holds paths, UIDs, ages, patient keys: the owner only


def private_dir(path: str | os.PathLike) -> Path:
    """Make `path` (and missing parents) and set it to 0700: a folder holding identifiers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def append_private(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a log file that holds identifiers (audit lines): created 0600 (its folder, when made
    here, 0700; a folder the site chose keeps its mode), and a file an older fedrad left readable by others is
    set back to 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
