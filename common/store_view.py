"""A lazy array over the decoded store's append-only chunk files: indexing reads only the rows asked for.

Why: the store never rewrites a chunk to put a site's images in one file (that was an O(N) copy for every
new film), so a site's images live in many chunks. This view looks like the uint16 [N, S, S] array the
trainer indexes (`view[idx]` with an int, slice or index array gives an in-memory copy of those rows), and
a local round that samples B images touches B rows, whatever N is.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import IO

import numpy as np

OPEN_CHUNKS = 64  # memory maps kept open (each holds a file descriptor)
BUSY = ".busy"  # shared flock: held by every open store and lazy view; `fedrad ingest --compact` takes it alone


def hold_store(folder: Path, exclusive: bool = False) -> IO[bytes] | None:
    """Take the store folder's busy lock (shared: blocks while a compaction runs; exclusive: non-blocking,
    None when anyone else holds it). Closing the returned file (or the process ending) releases it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        return open(os.devnull, "rb") if exclusive else None  # noqa: SIM115 - released by the caller
    f = open(os.open(Path(folder) / BUSY, os.O_CREAT | os.O_RDWR, 0o600), "a+b")  # noqa: SIM115
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    return f


class StoreView:
    """Rows `rows[i]` of chunk `names[chunk[i]]` under `folder`, in order, as a read-only lazy array."""

    def __init__(self, folder: Path, size: int, names: list[str], counts: list[int], chunk: np.ndarray,
                 rows: np.ndarray) -> None:
        self.folder, self.size = Path(folder), int(size)
        self.names, self.counts = list(names), list(counts)
        self.chunk = np.asarray(chunk, dtype=np.int32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dtype = np.dtype(np.uint16)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._hold = hold_store(self.folder)  # its chunks are opened lazily: no compaction while it lives

    def __getstate__(self) -> dict:  # sent to a spawned process (DDP ranks): maps and lock are reopened there
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_hold")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._maps = OrderedDict()
        self._hold = hold_store(self.folder)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), self.size, self.size)

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.rows)

    def _map(self, c: int) -> np.memmap:
        mm = self._maps.pop(c, None)
        if mm is None:
            mm = np.memmap(self.folder / self.names[c], dtype=np.uint16, mode="r",
                           shape=(self.counts[c], self.size, self.size))
            while len(self._maps) >= OPEN_CHUNKS:
                self._maps.popitem(last=False)
        self._maps[c] = mm
        return mm

    def __getitem__(self, idx):
        rest = ()
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        if isinstance(idx, int | np.integer):
            i = int(idx)
            out = np.array(self._map(int(self.chunk[i]))[self.rows[i]])
        else:
            sel = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
            if sel.dtype == bool:
                sel = np.flatnonzero(sel)
            sel = sel.astype(np.int64).reshape(-1)
            out = np.empty((len(sel), self.size, self.size), dtype=np.uint16)
            cs = self.chunk[sel]
            for c in np.unique(cs):
                where = np.flatnonzero(cs == c)
                out[where] = self._map(int(c))[self.rows[sel[where]]]
        return out[(slice(None), *rest)] if rest and out.ndim == 3 else (out[rest] if rest else out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def release(self) -> int:
        """Close the open memory maps (their file descriptors and the page-cache pages they map leave this
        process's RSS); the next read maps its chunk again. Returns how many were open."""
        n = len(self._maps)
        self._maps.clear()
        return n
