"""Site-local cache of decoded images: decode each file once, reuse it across rounds and runs.

Why: JPEG 2000 / JPEG-LS films decode at ~5-30 images/s, and Flower starts a fresh ClientApp process for
every message, so without a cache a site would re-decode its archive every round.

Layout under `cache_dir` (folders 0700, files 0600: the index holds pseudonymised header fields):
  salt.bin                  site salt for patient pseudonyms (0600; see header_signals), unless the site
                            keeps it in a state directory (`state_dir/salt`), which clearing the cache keeps
  s<size>/index.sqlite      SQLite (WAL): entries keyed by content fingerprint (sha256 of the file, or the
                            source's own fingerprint for a server), a memo path -> (size, mtime_ns,
                            fingerprint), and the chunk files with their row counts
  s<size>/chunk-<id>.u16    raw uint16 [rows, size, size] (value/65535 = intensity), append-only: written
                            once per batch of newly decoded images, never rewritten or consolidated
  s<size>/.lock             fcntl lock around publishing a chunk and deleting orphans
Scale (issue 26): nothing is read or rewritten whole. A batch of decodes is one new chunk (temp file,
fsync, rename) then one SQLite transaction naming it; a process killed anywhere leaves either an orphan
chunk (deleted later) or a committed batch, so a rerun decodes only what was never committed. Adding one
file costs one small chunk and one transaction; the images of a load are a lazy view over the chunks
(store_view.StoreView) unless they already are one whole chunk in order.
Unusable files are remembered with their SkipImage reason, so a corrupt file is not re-decoded each run
unless it changes. Decoding runs in worker processes under an address-space limit (sources/workers.py).
Format 3 (index.json + one consolidated chunk) is not migrated: its files are deleted and the folder is
decoded again once.

Over 500 lines because the store's index, chunk publishing, orphan collection and the load planning share one
SQLite connection and one lock, and splitting them would hand both across modules (store_view.py already holds
the read side).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import json
import os
import re
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from fedrad.common.file_lock import exclusive_lock
from fedrad.common.header_signals import load_site_salt
from fedrad.common.image_ops import to_uint16
from fedrad.common.sources.base import Frames, Item
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.dicom_folder import dicom_entry
from fedrad.common.sources.errors import reraise_fatal, skip_from
from fedrad.common.sources.workers import default_workers, map_isolated
from fedrad.common.store_view import StoreView, hold_store
from fedrad.common.wal_db import open_wal

__all__ = ["DecodedCache", "dicom_entry", "default_workers", "file_fingerprint"]

FORMAT_VERSION = 4  # 4: SQLite index, append-only chunks; 3: multi-frame objects (an entry per frame);
# 2: keyed by content; 1: by absolute path
# items decoded per committed chunk (what a kill can cost; FEDRAD_INGEST_BATCH overrides it for tests)
BATCH = int(os.environ.get("FEDRAD_INGEST_BATCH") or 1024)
INLINE_DECODE_MAX = 2000  # a round decodes pending images itself only up to this many (else `fedrad ingest`)

HASH_BLOCK = 1 << 20

Decoder = Callable[..., tuple[np.ndarray, dict]]  # (locator, size, salt[, max_pixels]) -> (image, meta)


def _work(decoder: Decoder, size: int, salt: bytes, budget: int | None, item: tuple[int, str]):
    """Worker body: never raises, so one odd file cannot take down a pool of thousands."""
    i, path = item
    try:
        img, meta = decoder(path, size, salt) if budget is None else decoder(path, size, salt, budget)
        if isinstance(img, Frames):  # a multi-frame object: already uint16, one row per usable frame
            if img.images.shape[1:] != (size, size):
                return i, None, {}, "bad-dimensions", f"decoder returned frames {img.images.shape}"
            return i, img, meta, "", ""
        if img.shape != (size, size):
            return i, None, {}, "bad-dimensions", f"decoder returned {img.shape}"
        return i, to_uint16(img), meta, "", ""
    except BaseException as exc:  # noqa: BLE001 - report, do not crash the site
        reraise_fatal(exc)
        skip = skip_from(exc)
        return i, None, {}, skip.reason, skip.detail


def _crashed(item: tuple[int, str], detail: str):
    return item[0], None, {}, "decoder-crashed", detail


def file_fingerprint(path: str) -> str:
    """Content identity of a local file: sha256 of its bytes (so a moved or renamed file is recognised)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _abs(path: str) -> str:
    """os.path.abspath, without its cost for a path that is absolute and normal already (10^5 per load)."""
    if os.sep == "/" and path.startswith("/") and "/." not in path and "//" not in path and path[-1:] != "/":
        return path
    return os.path.abspath(path)


def _takes_budget(decoder: Decoder) -> bool:
    try:
        params = inspect.signature(decoder).parameters
    except (TypeError, ValueError):
        return False
    return "max_pixels" in params


_SCHEMA = """
CREATE TABLE IF NOT EXISTS info(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(key TEXT PRIMARY KEY, e TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime INTEGER NOT NULL,
                                 fp TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(name TEXT PRIMARY KEY, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dirs(path BLOB PRIMARY KEY, mtime INTEGER NOT NULL, ino INTEGER NOT NULL);
"""
STALE_TMP_S = 600  # a temp chunk untouched this long belongs to a killed process


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)


class DecodedCache:
    """Decode-once cache for one image size. `load(paths)` / `load_items(items)` -> (images uint16 [N,S,S],
    kept, skipped).

    Entries are keyed by content fingerprint (sha256 of a local file's bytes, or the fingerprint a server
    source gives its items), so a moved or renamed folder is not decoded again; a memo of (path, size,
    mtime) -> fingerprint avoids re-hashing unchanged files. `decoder(locator, size, salt[, max_pixels])
    -> (float32 [S,S] in [0,1], json-able meta)` must be a module-level function (it runs in memory-limited
    worker processes); the default decodes DICOM and records header fields. The site salt lives in
    `state_dir/salt` when `state_dir` is given, else `cache_dir/salt.bin` (see header_signals.load_site_salt).
    The images returned are a memmap (one whole chunk in order) or a StoreView (rows of several chunks):
    both index like a uint16 array and neither can write the store.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], size: int, decoder: Decoder | None = None,
                 workers: int | None = None, state_dir: str | os.PathLike[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, hold: bool = True) -> None:
        self.root = Path(cache_dir)
        self.size = int(size)
        self.dir = self.root / f"s{self.size}"
        _private_dir(self.root)
        _private_dir(self.dir)
        self.decoder: Decoder = decoder or dicom_entry
        self.decoder_name = f"{self.decoder.__module__}.{self.decoder.__qualname__}"
        self.max_pixels = int(max_pixels)
        self._budget_arg = self.max_pixels if _takes_budget(self.decoder) else None
        self.salt = load_site_salt(self.root, state_dir)
        self.salt_id = hmac.new(self.salt, b"fedrad-salt-id", hashlib.sha256).hexdigest()[:12]
        self.workers = workers if workers is not None else default_workers()
        self.index_path = self.dir / "index.sqlite"
        self._hold = hold_store(self.dir) if hold else None  # waits while `fedrad ingest --compact` runs
        self._key_of: dict[str, str] = {}  # item id / locator of the last load -> fingerprint
        self._memo: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, fp) hashed, not yet stored
        self._loaded: dict[str, dict] = {}  # entries read while planning the last load (one query per item)
        self.pending = 0  # items of the last load left for `fedrad ingest` (see load_frames' max_decode)
        self.changed_paths: list[str] = []  # files that changed while read (not stored: decoded next time)
        self.stats: dict[str, float] = {"decoded": 0, "reused": 0, "hashed": 0, "changed": 0, "seconds": 0.0}
        self._db = self._open()

    # -- index -------------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        db = open_wal(self.index_path, _SCHEMA)  # WAL + synchronous NORMAL: a kill loses nothing committed
        want = {"version": str(FORMAT_VERSION), "size": str(self.size), "salt_id": self.salt_id}

        def ours() -> bool:
            have = dict(db.execute("SELECT k, v FROM info").fetchall())
            return {k: have.get(k) for k in want} == want

        if not ours():
            with self._locked(), self._tx(db):  # a new store, another salt: nothing in it is ours
                if not ours():  # read again under the lock: a second opener must not wipe what the first stored
                    for table in ("info", "entries", "files", "chunks", "dirs"):
                        db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
                    db.executemany("INSERT INTO info VALUES (?, ?)", list(want.items()))
            with contextlib.suppress(OSError):
                (self.dir / "index.json").unlink()  # format 3: decoded again, its chunks deleted by _gc
        self._db = db
        self._gc()
        return db

    @contextlib.contextmanager
    def _tx(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        db = db or self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _get(self, key: str) -> dict | None:
        e = self._loaded.get(key)
        if e is not None:
            return e
        row = self._db.execute("SELECT e FROM entries WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self._db.close()
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    # -- folder memo: the quick ingest pass (client/site/ingest.py) ---------------------------------------
    def dir_known(self, path: str, mtime_ns: int, ino: int) -> bool:
        """Were all files of folder `path` stored when it last had this mtime and inode?"""
        row = self._db.execute("SELECT mtime, ino FROM dirs WHERE path = ?", (os.fsencode(path),)).fetchone()
        return row is not None and (row[0], row[1]) == (mtime_ns, ino)

    def remember_dirs(self, rows: Sequence[tuple[str, int, int]], full: bool) -> None:
        """Record folders whose files are all stored; `full`: this was a full pass (the memo is replaced)."""
        with self._tx() as db:
            if full:
                db.execute("DELETE FROM dirs")
                db.execute("INSERT OR REPLACE INTO info VALUES ('full_pass', ?)", (repr(time.time()),))
            db.executemany("INSERT OR REPLACE INTO dirs VALUES (?, ?, ?)",
                           [(os.fsencode(p), m, i) for p, m, i in rows])

    def last_full_pass(self) -> float | None:
        """time.time() of the last completed full ingest pass, None if none was."""
        row = self._db.execute("SELECT v FROM info WHERE k = 'full_pass'").fetchone()
        return float(row[0]) if row else None

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.dir / ".lock")

    def _fresh(self, entry: dict | None) -> bool:
        if entry is None or entry.get("decoder") != self.decoder_name:
            return False
        # a budget skip is only as good as the budget it was judged against; running out of memory says as
        # much about the machine at that moment as about the file, so it is tried again at every load
        if entry.get("reason") == "out-of-memory":
            return False
        return entry.get("reason") != "too-large" or entry.get("max_pixels") == self.max_pixels

    def _fingerprint(self, item: Item, memo: tuple | None | bool = False) -> str | None:
        """The item's content key: given by the source, else the local file's hash (memoised by stat).
        `memo`: the file's (size, mtime, fp) row already read (None: it has none; False: read it here)."""
        if item.fingerprint:
            return item.fingerprint
        path = _abs(item.locator)
        try:
            st = os.stat(path)
            row = self._db.execute("SELECT size, mtime, fp FROM files WHERE path = ?",
                                   (os.fsencode(path),)).fetchone() if memo is False else memo
            if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                return row[2]
            fp = file_fingerprint(path)
            after = os.stat(path)
        except OSError:
            return None
        self.stats["hashed"] += 1
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not memoised while it changes
            self._memo[path] = (st.st_size, st.st_mtime_ns, fp)
        return fp

    def _rows(self, sql: str, keys: list) -> dict:
        """{key: rest of row} for `sql` ('SELECT key, ... WHERE key IN ({})'), 500 keys a query."""
        out: dict = {}
        for k in range(0, len(keys), 500):
            part = keys[k:k + 500]
            out.update((r[0], r[1:]) for r in self._db.execute(sql.format(",".join("?" * len(part))), part))
        return out

    def _fingerprints(self, items: Sequence[Item]) -> list[str | None]:
        """_fingerprint of each item, the memo rows read a few hundred per query (node start, issue 26)."""
        paths = [b"" if it.fingerprint else os.fsencode(_abs(it.locator)) for it in items]
        memo = self._rows("SELECT path, size, mtime, fp FROM files WHERE path IN ({})", [p for p in paths if p])
        return [it.fingerprint or self._fingerprint(it, memo.get(p)) for it, p in zip(items, paths, strict=True)]

    # -- chunks ------------------------------------------------------------------------------------
    def _gc(self) -> None:
        """Delete chunk files no committed batch names (a process killed between rename and commit; format 3)."""
        with self._locked():
            used = {r[0] for r in self._db.execute("SELECT name FROM chunks")}
            now = time.time()
            for p in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    if p.name.startswith("chunk-") and p.name not in used:
                        p.unlink()  # a process still mapping it keeps its pages (POSIX unlink semantics)
                    elif p.name.startswith(".chunk-") and now - p.stat().st_mtime > STALE_TMP_S:
                        p.unlink()

    # -- decode ----------------------------------------------------------------------------------------
    def _decode(self, todo: list[tuple[int, str]], progress: bool) -> Iterator[tuple]:
        work = partial(_work, self.decoder, self.size, self.salt, self._budget_arg)
        yield from map_isolated(work, todo, _crashed, workers=self.workers, progress=progress,
                                desc=f"decoding {self.size}px")

    def load(self, paths: Sequence[str | os.PathLike[str]], progress: bool = True,
             ) -> tuple[np.ndarray, list[int], dict[str, str]]:
        """Images for local files `paths` in order (skipped is keyed by the path as given); see load_items."""
        given = [os.fspath(p) for p in paths]
        return self.load_items([Item(g, os.path.abspath(g)) for g in given], progress)

    def load_items(self, items: Sequence[Item], progress: bool = True,
                   ) -> tuple[np.ndarray, list[int], dict[str, str]]:
        """Images for a source's `items` in order, decoding only content not seen before.

        Returns (images uint16 [len(kept), S, S], kept: indices into `items` that decoded, skipped:
        {item_id: reason}). A multi-frame item gives one image per usable frame, so its index repeats in
        `kept` (load_frames names each frame). `entry(item_id)` gives the stored meta / skip detail.
        """
        images, _frames, origin, skipped = self._load(items, progress)
        return images, origin, skipped

    def load_frames(self, items: Sequence[Item], progress: bool = True,
                    accept: Callable[[dict], tuple[str, str] | None] | None = None,
                    max_decode: int | None = None) -> tuple[np.ndarray, list[Item], dict[str, str]]:
        """Like load_items, but returns the kept images' items: a multi-frame object's frames are items of
        their own (`<item_id>#<k>`, fingerprint `<content>#f<k>`); skipped frames are listed by that id.
        `accept(meta)` -> (reason, detail) keeps a decoded image out (the site policy's data rules).
        `max_decode`: when more items than this need decoding, decode none of them here and leave them out
        (`self.pending` says how many): a round trains on what `fedrad ingest` already decoded."""
        images, frames, _origin, skipped = self._load(items, progress, accept, max_decode)
        return images, frames, skipped

    def ingest(self, items: Sequence[Item], progress: bool = True) -> dict[str, int]:
        """Decode every item not stored yet, in committed batches (resumable); no images are gathered."""
        t0 = time.perf_counter()
        fps, todo = self._plan(items)
        self._loaded = {}  # nothing is gathered: keep memory to the slice being decoded
        if todo:
            self._decode_batches(todo, fps, items, progress)
        self._flush_memo()
        self.stats["reused"] += len(items) - len(todo)
        self.stats["seconds"] += time.perf_counter() - t0
        return {"items": len(items), "decoded": len(todo) - int(self.stats["changed"]),
                "stored_before": len(items) - len(todo), "changed_while_read": int(self.stats["changed"])}

    def _plan(self, items: Sequence[Item]) -> tuple[list[str | None], list[tuple[int, str]]]:
        """(fingerprint per item, the (index, locator) of each distinct content not decoded yet)."""
        self._memo = {}
        self._loaded = {}
        fps = self._fingerprints(items)
        stored = self._rows("SELECT key, e FROM entries WHERE key IN ({})", list({f for f in fps if f}))
        todo: list[tuple[int, str]] = []
        queued: set[str] = set()
        for i, (it, fp) in enumerate(zip(items, fps, strict=True)):
            if fp is not None and fp not in queued and not self._fresh_item(fp, stored.get(fp, ())):
                todo.append((i, it.locator))
                queued.add(fp)
        return fps, todo

    def _flush_memo(self) -> None:
        if self._memo:
            with self._tx() as db:
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                               [(os.fsencode(p), *v) for p, v in self._memo.items()])
            self._memo = {}

    def _load(self, items: Sequence[Item], progress: bool, accept: Callable | None = None,
              max_decode: int | None = None) -> tuple[np.ndarray, list[Item], list[int], dict]:
        t0 = time.perf_counter()
        fps, todo = self._plan(items)
        waiting: set[str] = set()
        self.pending = 0
        if max_decode is not None and len(todo) > max_decode:
            waiting = {fps[i] for i, _ in todo}
            self.pending, todo = len(todo), []
        if todo:
            self._decode_batches(todo, fps, items, progress)
        self._flush_memo()
        self.stats["reused"] += len(items) - len(todo) - self.pending

        self._key_of = {}
        frames: list[Item] = []
        origin: list[int] = []
        refs: list[tuple[str, int]] = []
        skipped: dict[str, str] = {}
        for i, (it, fp) in enumerate(zip(items, fps, strict=True)):
            if fp is None:
                skipped[it.item_id] = "unreadable"
                continue
            if fp in waiting:
                continue
            self._key_of[it.item_id] = fp
            self._key_of[_abs(it.locator)] = fp
            e = self._get(fp)
            if e is None:  # changed while it was read: not stored, decoded at the next load
                skipped[it.item_id] = "unreadable"
                continue
            refused = accept(e.get("meta", {})) if accept is not None and "reason" not in e else None
            if refused:
                skipped[it.item_id] = refused[0]
            elif "chunk" in e:
                frames.append(it)
                origin.append(i)
                refs.append((e["chunk"], e["row"]))
            elif e.get("frames"):
                for k in range(int(e["frames"])):
                    fk, fid = frame_key(fp, k), f"{it.item_id}#{k}"
                    self._key_of[fid] = fk
                    fe = self._get(fk) or {}
                    if "chunk" in fe:
                        frames.append(Item(fid, it.locator, fk))
                        origin.append(i)
                        refs.append((fe["chunk"], fe["row"]))
                    else:
                        skipped[fid] = fe.get("reason", "decode-failed")
            else:
                skipped[it.item_id] = e.get("reason", "decode-failed")
        images = self._gather(refs)
        self.stats["seconds"] += time.perf_counter() - t0
        return images, frames, origin, skipped

    def _fresh_item(self, fp: str, row: tuple = ()) -> bool:
        """Is `fp` decoded already (a multi-frame object: its entry and every frame's entry)? `row`: its
        entry's text, read already."""
        e = json.loads(row[0]) if row else self._get(fp)
        if not self._fresh(e):
            return False
        frames = {k: self._get(frame_key(fp, k)) for k in range(int(e.get("frames") or 0))}
        if any(f is None for f in frames.values()):
            return False
        self._loaded[fp] = e  # read once: the gather and meta() below use it
        self._loaded.update((frame_key(fp, k), f) for k, f in frames.items())
        return True

    def _decode_batches(self, todo: list[tuple[int, str]], fps: list[str | None], items: Sequence[Item],
                        progress: bool) -> None:
        """Decode `todo`, publishing every BATCH items as one new chunk plus one index transaction."""
        batch: _Batch | None = None
        try:
            for n, (i, img, meta, reason, detail) in enumerate(self._decode(todo, progress), 1):
                batch = batch or _Batch(self.dir, self.size)
                if not items[i].fingerprint and self._changed_since_hashed(items[i].locator, fps[i]):
                    self.stats["changed"] += 1  # the bytes decoded may not be the bytes hashed: not stored
                    self.changed_paths.append(_abs(items[i].locator))
                else:
                    self._add(batch, fps[i], img, meta, reason, detail)
                if n % BATCH == 0:
                    self._publish(batch)
                    batch = None
            if batch is not None:
                self._publish(batch)
                batch = None
        finally:
            if batch is not None:
                batch.discard()

    def _changed_since_hashed(self, locator: str, fp: str | None) -> bool:
        path = _abs(locator)
        memo = self._memo.get(path)
        if memo is None:
            row = self._db.execute("SELECT size, mtime, fp FROM files WHERE path = ?", (os.fsencode(path),)).fetchone()
            memo = tuple(row) if row else None
        try:
            st = os.stat(path)
        except OSError:
            return True
        return memo is None or memo[2] != fp or (memo[0], memo[1]) != (st.st_size, st.st_mtime_ns)

    def _add(self, batch: _Batch, fp: str, img, meta: dict, reason: str, detail: str) -> None:
        """Rows of one decode result into the batch's chunk, entries into its pending transaction."""
        entry: dict = {"decoder": self.decoder_name}
        if isinstance(img, Frames):
            entry.update(frames=img.total, meta=meta)
            for r, (k, m) in enumerate(zip(img.index, img.metas, strict=True)):
                row = batch.write(img.images[r])
                batch.entries.append((frame_key(fp, k), {"decoder": self.decoder_name, "chunk": batch.name,
                                                         "row": row, "meta": m}))
            for k, why, more in img.skipped:
                batch.entries.append((frame_key(fp, k), {"decoder": self.decoder_name, "reason": why,
                                                         "detail": more}))
        elif img is not None:
            entry.update(chunk=batch.name, row=batch.write(img), meta=meta)
        else:
            entry.update(reason=reason, detail=detail)
            if reason == "too-large":
                entry["max_pixels"] = self.max_pixels
        batch.entries.append((fp, entry))
        batch.items += 1

    def _publish(self, batch: _Batch) -> None:
        """Make a batch durable: chunk fsynced and renamed, then one transaction naming it and its entries."""
        batch.close()
        with self._locked():
            if batch.rows:
                os.replace(batch.tmp, self.dir / batch.name)
            else:
                batch.discard()
            with self._tx() as db:
                if batch.rows:
                    db.execute("INSERT INTO chunks VALUES (?, ?)", (batch.name, batch.rows))
                db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?)",
                               [(k, json.dumps(e, separators=(",", ":"))) for k, e in batch.entries])
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                               [(os.fsencode(p), *v) for p, v in self._memo.items()])
            self._memo = {}
        self.stats["decoded"] += batch.items

    def _gather(self, refs: list[tuple[str, int]]) -> np.ndarray | StoreView:
        """The images at `refs`: the chunk itself when it is exactly them in order, else a lazy view."""
        n = len(refs)
        if n == 0:
            return np.zeros((0, self.size, self.size), dtype=np.uint16)
        names = sorted({c for c, _ in refs})
        counts = {}
        for k in range(0, len(names), 500):
            part = names[k:k + 500]
            counts.update(self._db.execute(
                f"SELECT name, rows FROM chunks WHERE name IN ({','.join('?' * len(part))})", part).fetchall())
        first = refs[0][0]
        if len(names) == 1 and counts[first] == n and all(r == j for j, (_c, r) in enumerate(refs)):
            # mode "c": copy-on-write, so callers get a writable array without ever touching the store
            return np.memmap(self.dir / first, dtype=np.uint16, mode="c", shape=(n, self.size, self.size))
        pos = {c: j for j, c in enumerate(names)}
        return StoreView(self.dir, self.size, names, [counts[c] for c in names],
                         np.fromiter((pos[c] for c, _ in refs), dtype=np.int32, count=n),
                         np.fromiter((r for _, r in refs), dtype=np.int64, count=n))

    def entry(self, key: str | os.PathLike[str]) -> dict | None:
        """The index entry for an item id or path of the last load: `meta` if decoded, else `reason`/`detail`."""
        k = os.fspath(key)
        fp = self._key_of.get(k) or self._key_of.get(os.path.abspath(k))
        return self._get(fp) if fp else None

    def meta(self, key: str | os.PathLike[str]) -> dict:
        """Stored header fields of an item or frame (a frame's own fields over its object's)."""
        k = os.fspath(key)
        fp = self._key_of.get(k) or self._key_of.get(os.path.abspath(k))
        e = self._get(fp) if fp else None
        if not e:
            return {}
        out = dict(e.get("meta", {}))
        if _FRAME.search(fp):
            base = self._get(_FRAME.sub("", fp)) or {}
            out = {**base.get("meta", {}), **out}
        return out


class _Batch:
    """One chunk being written: a private temp file of raw uint16 rows and the entries naming its rows."""

    def __init__(self, folder: Path, size: int) -> None:
        self.name = f"chunk-{uuid.uuid4().hex[:16]}.u16"
        self.size = size
        fd, self.tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".tmp", dir=folder)  # 0600
        self.file = os.fdopen(fd, "wb")
        self.rows = 0
        self.items = 0
        self.entries: list[tuple[str, dict]] = []

    def write(self, img: np.ndarray) -> int:
        self.file.write(np.ascontiguousarray(img, dtype=np.uint16).tobytes())
        self.rows += 1
        return self.rows - 1

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


_FRAME = re.compile(r"#f\d+$")


def frame_key(fp: str, k: int) -> str:
    """The cache key of frame `k` of the content `fp`."""
    return f"{fp}#f{k}"
