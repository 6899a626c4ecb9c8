"""`fedrad ingest --compact`: rewrite the decoded store without the images of files that left the site folder.

Why (issue 26): chunks are append-only, so a deleted or replaced film keeps its decoded rows (and its index
entry) forever. Compaction drops them: it lists the folder, keeps every entry whose content a current file
still has, and rewrites each chunk that holds dead rows (a chunk with no dead row is not touched; one with no
live row is deleted). Each rewrite is a new chunk (temp file, fsync, rename) and one transaction that points
the live entries at it; the old chunk is deleted after the commit. Killed anywhere, the store is the old one
or the new one for each chunk, and an orphan chunk is deleted at the next open (DecodedCache._gc); a full disk
leaves the store as it was for the chunk being written.

It needs the store alone: rounds and ingests hold the store's busy lock (shared) while they use it, a lazy
view of a round included, and compaction takes it exclusively without waiting: `CompactRefused` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np

from fedrad.common.cache import DecodedCache, _Batch
from fedrad.common.sources.base import Reader
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.store_view import hold_store

SLICE = 16384  # items fingerprinted per step (bounded memory)
_FRAME = re.compile(r"#f\d+$")


class CompactRefused(RuntimeError):
    """The store is in use (a round's node or another ingest): compaction would pull chunks from under it."""


def compact_store(cache_dir: str | os.PathLike[str], size: int, reader: Reader,
                  state_dir: str | os.PathLike[str] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, int]:
    """Drop the store's entries and rows of content no file of `reader` has any more; counts of what it did."""
    cache = DecodedCache(cache_dir, size, decoder=reader.entry, workers=0, state_dir=state_dir,
                         max_pixels=max_pixels, hold=False)
    try:
        lock = hold_store(cache.dir, exclusive=True)
        if lock is None:
            raise CompactRefused(f"the image store {cache.dir} is in use by a round or another `fedrad ingest`; "
                                 "run `fedrad ingest --compact` again when the node is idle")
        with lock:
            return _compact(cache, reader)
    finally:
        cache.close()


def _compact(cache: DecodedCache, reader: Reader) -> dict[str, int]:
    items = reader.list_items().items
    live: set[str] = set()
    for start in range(0, len(items), SLICE):
        part = items[start:start + SLICE]
        cache._memo = {}
        live.update(fp for fp in (cache._fingerprint(it) for it in part) if fp)
        cache._flush_memo()
    listed = {os.fsencode(os.path.abspath(it.locator)) for it in items if not it.fingerprint}
    db = cache._db
    out = {"files_forgotten": 0, "entries_dropped": 0, "rows_dropped": 0, "chunks_rewritten": 0,
           "chunks_dropped": 0, "bytes_freed": 0}
    gone_files = [p for (p,) in db.execute("SELECT path FROM files") if p not in listed]
    dead: list[str] = []
    keep: dict[str, list[tuple[int, str, dict]]] = {}  # chunk -> (row, key, entry) of its live rows
    for key, text in db.execute("SELECT key, e FROM entries"):
        if _FRAME.sub("", key) not in live:
            dead.append(key)
            continue
        e = json.loads(text)
        if "chunk" in e:
            keep.setdefault(e["chunk"], []).append((int(e["row"]), key, e))
    with cache._tx() as tx:
        tx.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone_files])
        tx.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in dead])
    out["files_forgotten"], out["entries_dropped"] = len(gone_files), len(dead)
    row_bytes = cache.size * cache.size * 2
    for name, rows in db.execute("SELECT name, rows FROM chunks").fetchall():
        alive = sorted(keep.get(name, []), key=lambda r: r[0])
        if len(alive) == rows:
            continue
        out["rows_dropped"] += rows - len(alive)
        out["bytes_freed"] += (rows - len(alive)) * row_bytes
        if alive:
            _rewrite(cache, name, rows, alive)
            out["chunks_rewritten"] += 1
        else:
            with cache._tx() as tx:
                tx.execute("DELETE FROM chunks WHERE name = ?", (name,))
            out["chunks_dropped"] += 1
        with contextlib.suppress(OSError):
            (cache.dir / name).unlink()
    return out


def _rewrite(cache: DecodedCache, name: str, rows: int, alive: list[tuple[int, str, dict]]) -> None:
    """Copy chunk `name`'s live rows into a new chunk and point their entries at it, in one transaction."""
    old = np.memmap(Path(cache.dir) / name, dtype=np.uint16, mode="r", shape=(rows, cache.size, cache.size))
    batch = _Batch(cache.dir, cache.size)
    try:
        moved = []
        for row, key, e in alive:
            e = {**e, "chunk": batch.name, "row": batch.write(old[row])}
            moved.append((json.dumps(e, separators=(",", ":")), key))
        batch.close()
        del old
        with cache._locked():
            os.replace(batch.tmp, cache.dir / batch.name)
            with cache._tx() as tx:
                tx.execute("INSERT INTO chunks VALUES (?, ?)", (batch.name, batch.rows))
                tx.executemany("UPDATE entries SET e = ? WHERE key = ?", moved)
                tx.execute("DELETE FROM chunks WHERE name = ?", (name,))
    except BaseException:
        batch.discard()
        raise
