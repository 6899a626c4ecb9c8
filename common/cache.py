"""Site-local cache of decoded images: decode each file once, reuse it across rounds and runs.

Why: JPEG 2000 / JPEG-LS films decode at ~5-30 images/s, and Flower starts a fresh ClientApp process for
every message, so without a cache a site would re-decode its archive every round.

Layout under `cache_dir`:
  salt.bin                  site salt for patient pseudonyms (0600; see header_signals), unless the site
                            keeps it in a state directory (`state_dir/salt`), which clearing the cache keeps
  s<size>/index.json        entries keyed by content fingerprint (sha256 of the file, or the source's own
                            fingerprint for a server), plus a memo path -> (size, mtime_ns, fingerprint)
  s<size>/chunk-<id>.u16    raw uint16 [rows, size, size] (value/65535 = intensity), read via np.memmap
  s<size>/.lock             fcntl lock: concurrent loaders (scan, node, clientapp) wait rather than race
Unusable files are remembered with their SkipImage reason, so a corrupt file is not re-decoded each run
unless it changes. Decoding runs in worker processes under an address-space limit (sources/workers.py).
Every write is a new temp file + os.replace (a crash leaves the old state or the new one, never a torn
file); chunk files are immutable once written and unreferenced ones are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from fedrad.common.atomic import PRIVATE_FILE, atomic_write_bytes, private_dir
from fedrad.common.header_signals import load_site_salt
from fedrad.common.image_ops import to_uint16
from fedrad.common.sources.base import Frames, Item
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.dicom_folder import dicom_entry
from fedrad.common.sources.errors import reraise_fatal, skip_from
from fedrad.common.sources.workers import default_workers, map_isolated

__all__ = ["DecodedCache", "dicom_entry", "default_workers", "file_fingerprint"]

FORMAT_VERSION = 3  # 3: multi-frame objects (an entry per frame); 2: keyed by content; 1: by absolute path
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


def _takes_budget(decoder: Decoder) -> bool:
    try:
        params = inspect.signature(decoder).parameters
    except (TypeError, ValueError):
        return False
    return "max_pixels" in params


class DecodedCache:
    """Decode-once cache for one image size. `load(paths)` / `load_items(items)` -> (images uint16 [N,S,S],
    kept, skipped).

    Entries are keyed by content fingerprint (sha256 of a local file's bytes, or the fingerprint a server
    source gives its items), so a moved or renamed folder is not decoded again; a memo of (path, size,
    mtime) -> fingerprint avoids re-hashing unchanged files. `decoder(locator, size, salt[, max_pixels])
    -> (float32 [S,S] in [0,1], json-able meta)` must be a module-level function (it runs in memory-limited
    worker processes); the default decodes DICOM and records header fields. The site salt lives in
    `state_dir/salt` when `state_dir` is given, else `cache_dir/salt.bin` (see header_signals.load_site_salt).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], size: int, decoder: Decoder | None = None,
                 workers: int | None = None, state_dir: str | os.PathLike[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(cache_dir)
        self.size = int(size)
        self.dir = private_dir(self.root / f"s{self.size}")  # decoded images and their index: the owner only
        self.decoder: Decoder = decoder or dicom_entry
        self.decoder_name = f"{self.decoder.__module__}.{self.decoder.__qualname__}"
        self.max_pixels = int(max_pixels)
        self._budget_arg = self.max_pixels if _takes_budget(self.decoder) else None
        self.salt = load_site_salt(self.root, state_dir)
        self.salt_id = hmac.new(self.salt, b"fedrad-salt-id", hashlib.sha256).hexdigest()[:12]
        self.workers = workers if workers is not None else default_workers()
        self.index_path = self.dir / "index.json"
        self._entries: dict[str, dict] = {}
        self._files: dict[str, list] = {}  # absolute path -> [size, mtime_ns, fingerprint]
        self._key_of: dict[str, str] = {}  # item id / locator of the last load -> fingerprint
        self.stats: dict[str, float] = {"decoded": 0, "reused": 0, "hashed": 0, "seconds": 0.0}

    # -- index -------------------------------------------------------------------------------------
    def _read_index(self) -> tuple[dict[str, dict], dict[str, list]]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, {}
        if (data.get("version") != FORMAT_VERSION or data.get("size") != self.size
                or data.get("salt_id") != self.salt_id):
            return {}, {}
        entries = data.get("entries", {})
        # A chunk that vanished (manual cleanup) invalidates the entries that pointed into it.
        chunks = {e["chunk"] for e in entries.values() if e.get("chunk")}
        missing = {c for c in chunks if not (self.dir / c).exists()}
        return {k: e for k, e in entries.items() if e.get("chunk") not in missing}, data.get("files", {})

    def _write_index(self) -> None:
        files = {p: v for p, v in self._files.items() if v[2] in self._entries and os.path.exists(p)}
        # Keep what this load used and what a file still on disk holds; forget content nothing points to.
        live = set(self._key_of.values()) | {v[2] for v in files.values()}
        self._entries = {k: e for k, e in self._entries.items() if k in live}
        payload = {"version": FORMAT_VERSION, "size": self.size, "salt_id": self.salt_id,
                   "entries": self._entries, "files": files}
        atomic_write_bytes(self.index_path, json.dumps(payload, separators=(",", ":")).encode("utf-8"),
                           mode=PRIVATE_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, writes are still atomic
            yield
            return
        with open(self.dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _fresh(self, entry: dict | None) -> bool:
        if entry is None or entry.get("decoder") != self.decoder_name:
            return False
        # a budget skip is only as good as the budget it was judged against; running out of memory says as
        # much about the machine at that moment as about the file, so it is tried again at every load
        if entry.get("reason") == "out-of-memory":
            return False
        return entry.get("reason") != "too-large" or entry.get("max_pixels") == self.max_pixels

    def _fingerprint(self, item: Item) -> str | None:
        """The item's content key: given by the source, else the local file's hash (memoised by stat)."""
        if item.fingerprint:
            return item.fingerprint
        path = os.path.abspath(item.locator)
        try:
            st = os.stat(path)
            memo = self._files.get(path)
            if memo and memo[0] == st.st_size and memo[1] == st.st_mtime_ns:
                return memo[2]
            fp = file_fingerprint(path)
        except OSError:
            return None
        self.stats["hashed"] += 1
        self._files[path] = [st.st_size, st.st_mtime_ns, fp]
        return fp

    # -- chunks ------------------------------------------------------------------------------------
    def _chunk(self, name: str, rows: int) -> np.ndarray:
        if rows == 0:
            return np.zeros((0, self.size, self.size), dtype=np.uint16)
        # mode "c": copy-on-write, so callers get a writable array without ever touching the cache file.
        return np.memmap(self.dir / name, dtype=np.uint16, mode="c", shape=(rows, self.size, self.size))

    def _new_chunk(self, rows: int, fill: Callable[[np.ndarray], None]) -> str:
        name = f"chunk-{uuid.uuid4().hex[:16]}.u16"
        fd, tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            mm = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(rows, self.size, self.size))
            fill(mm)
            mm.flush()
            del mm
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return name

    def _gc(self) -> None:
        used = {e["chunk"] for e in self._entries.values() if e.get("chunk")}
        for p in self.dir.glob("chunk-*.u16"):
            if p.name not in used:
                with contextlib.suppress(OSError):
                    p.unlink()  # a process still mapping it keeps its pages (POSIX unlink semantics)

    def _chunk_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        for e in self._entries.values():
            if e.get("chunk"):
                rows[e["chunk"]] = max(rows.get(e["chunk"], 0), e["row"] + 1)
        return rows

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
                    ) -> tuple[np.ndarray, list[Item], dict[str, str]]:
        """Like load_items, but returns the kept images' items: a multi-frame object's frames are items of
        their own (`<item_id>#<k>`, fingerprint `<content>#f<k>`); skipped frames are listed by that id.
        `accept(meta)` -> (reason, detail) keeps a decoded image out (the site policy's data rules)."""
        images, frames, _origin, skipped = self._load(items, progress, accept)
        return images, frames, skipped

    def _load(self, items: Sequence[Item], progress: bool, accept: Callable | None = None,
              ) -> tuple[np.ndarray, list[Item], list[int], dict]:
        t0 = time.perf_counter()
        with self._locked():
            self._entries, self._files = self._read_index()
            hashed = self.stats["hashed"]
            fps = [self._fingerprint(it) for it in items]
            todo: list[tuple[int, str]] = []
            queued: set[str] = set()
            for i, (it, fp) in enumerate(zip(items, fps, strict=True)):
                if fp is not None and fp not in queued and not self._fresh_item(fp):
                    todo.append((i, it.locator))
                    queued.add(fp)
            changed = bool(todo) or self.stats["hashed"] > hashed
            if todo:
                self._decode_into_chunk(todo, fps, progress)
            self.stats["reused"] += len(items) - len(todo)

            self._key_of = {}
            frames: list[Item] = []
            origin: list[int] = []
            keys: list[str] = []
            skipped: dict[str, str] = {}
            for i, (it, fp) in enumerate(zip(items, fps, strict=True)):
                if fp is None:
                    skipped[it.item_id] = "unreadable"
                    continue
                self._key_of[it.item_id] = fp
                self._key_of[os.path.abspath(it.locator)] = fp
                e = self._entries[fp]
                refused = accept(e.get("meta", {})) if accept is not None and "reason" not in e else None
                if refused:
                    skipped[it.item_id] = refused[0]
                elif "chunk" in e:
                    frames.append(it)
                    origin.append(i)
                    keys.append(fp)
                elif e.get("frames"):
                    for k in range(int(e["frames"])):
                        fk, fid = frame_key(fp, k), f"{it.item_id}#{k}"
                        self._key_of[fid] = fk
                        fe = self._entries.get(fk, {})
                        if "chunk" in fe:
                            frames.append(Item(fid, it.locator, fk))
                            origin.append(i)
                            keys.append(fk)
                        else:
                            skipped[fid] = fe.get("reason", "decode-failed")
                else:
                    skipped[it.item_id] = e.get("reason", "decode-failed")
            images, consolidated = self._gather(keys)
            if changed or consolidated:
                self._write_index()
                self._gc()
        self.stats["seconds"] += time.perf_counter() - t0
        return images, frames, origin, skipped

    def _fresh_item(self, fp: str) -> bool:
        """Is `fp` decoded already (a multi-frame object: its entry and every frame's entry)?"""
        e = self._entries.get(fp)
        if not self._fresh(e):
            return False
        return not e.get("frames") or all(frame_key(fp, k) in self._entries for k in range(int(e["frames"])))

    def _decode_into_chunk(self, todo: list[tuple[int, str]], fps: list[str | None], progress: bool) -> None:
        """Decode `todo` straight into one new chunk file, appended row by row (frames included)."""
        results: dict[int, tuple] = {}
        rows: dict[str, int] = {}  # entry key -> row in the chunk

        def write(f) -> int:
            n = 0
            for i, img, meta, reason, detail in self._decode(todo, progress):
                results[i] = (img, meta, reason, detail)
                fp = fps[i]
                if isinstance(img, Frames):
                    for r, k in enumerate(img.index):
                        f.write(np.ascontiguousarray(img.images[r], dtype=np.uint16).tobytes())
                        rows[frame_key(fp, k)] = n
                        n += 1
                    results[i] = (None, meta, reason, detail, img.index, img.metas, img.skipped, img.total)
                elif img is not None:
                    f.write(np.ascontiguousarray(img, dtype=np.uint16).tobytes())
                    rows[fp] = n
                    n += 1
            return n

        chunk = self._stream_chunk(write)
        for i, _loc in todo:
            fp = fps[i]
            img, meta, reason, detail, *multi = results[i]
            entry: dict = {"decoder": self.decoder_name}
            if multi:
                index, metas, skips, total = multi
                entry.update(frames=total, meta=meta)
                for k, m in zip(index, metas, strict=True):
                    self._entries[frame_key(fp, k)] = {"decoder": self.decoder_name, "chunk": chunk,
                                                       "row": rows[frame_key(fp, k)], "meta": m}
                for k, why, more in skips:
                    self._entries[frame_key(fp, k)] = {"decoder": self.decoder_name, "reason": why, "detail": more}
            elif fp in rows:
                entry.update(chunk=chunk, row=rows[fp], meta=meta)
            else:
                entry.update(reason=reason, detail=detail)
                if reason == "too-large":
                    entry["max_pixels"] = self.max_pixels
            self._entries[fp] = entry
        self.stats["decoded"] += len(todo)

    def _stream_chunk(self, write: Callable) -> str:
        """A new chunk file from `write(file) -> rows` (raw uint16 rows appended), or '' when no row came."""
        name = f"chunk-{uuid.uuid4().hex[:16]}.u16"
        fd, tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                n = write(f)
                f.flush()
                os.fsync(f.fileno())
            if n == 0:
                os.unlink(tmp)
                return ""
            os.replace(tmp, self.dir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return name

    def _gather(self, keys: list[str]) -> tuple[np.ndarray, bool]:
        """One memmap holding `keys` in order: reuse a chunk that already is exactly that, else write one."""
        n = len(keys)
        if n == 0:
            return np.zeros((0, self.size, self.size), dtype=np.uint16), False
        refs = [(self._entries[k]["chunk"], self._entries[k]["row"]) for k in keys]
        rows = self._chunk_rows()
        first = refs[0][0]
        if rows.get(first) == n and all(c == first and r == j for j, (c, r) in enumerate(refs)):
            return self._chunk(first, n), False
        sources = {c: self._chunk(c, rows[c]) for c in {c for c, _ in refs}}

        def fill(mm: np.ndarray) -> None:
            for j, (c, r) in enumerate(refs):
                mm[j] = sources[c][r]

        name = self._new_chunk(n, fill)
        sources.clear()
        for j, k in enumerate(keys):
            self._entries[k]["chunk"], self._entries[k]["row"] = name, j
        return self._chunk(name, n), True

    def entry(self, key: str | os.PathLike[str]) -> dict | None:
        """The index entry for an item id or path of the last load: `meta` if decoded, else `reason`/`detail`."""
        k = os.fspath(key)
        fp = self._key_of.get(k) or self._key_of.get(os.path.abspath(k))
        return self._entries.get(fp) if fp else None

    def meta(self, key: str | os.PathLike[str]) -> dict:
        """Stored header fields of an item or frame (a frame's own fields over its object's)."""
        k = os.fspath(key)
        fp = self._key_of.get(k) or self._key_of.get(os.path.abspath(k))
        e = self._entries.get(fp) if fp else None
        if not e:
            return {}
        out = dict(e.get("meta", {}))
        if _FRAME.search(fp):
            base = self._entries.get(_FRAME.sub("", fp), {})
            out = {**base.get("meta", {}), **out}
        return out


_FRAME = re.compile(r"#f\d+$")


def frame_key(fp: str, k: int) -> str:
    """The cache key of frame `k` of the content `fp`."""
    return f"{fp}#f{k}"
