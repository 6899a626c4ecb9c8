"""Site-local cache of decoded images: decode each file once, reuse it across rounds and runs.

Why: JPEG 2000 / JPEG-LS films decode at ~5-30 images/s, and Flower starts a fresh ClientApp process for
every message, so without a cache a site would re-decode its archive every round.

Layout under `cache_dir`:
  salt.bin                  site salt for patient pseudonyms (0600; see header_signals)
  s<size>/index.json        entries keyed by absolute path, valid while (file size, mtime_ns) match
  s<size>/chunk-<id>.u16    raw uint16 [rows, size, size] (value/65535 = intensity), read via np.memmap
  s<size>/.lock             fcntl lock: concurrent loaders (scan, node, clientapp) wait rather than race
Unusable files are remembered with their SkipImage reason, so a corrupt file is not re-decoded each run
unless it changes. Every write is a new temp file + os.replace (a crash leaves the old state or the new
one, never a torn file); chunk files are immutable once written and unreferenced ones are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from fedrad.common.atomic import atomic_write_bytes
from fedrad.common.dicom_io import SkipImage, decode_with_header
from fedrad.common.header_signals import load_or_create_salt, patient_key
from fedrad.common.image_ops import to_uint16

FORMAT_VERSION = 1
POOL_MIN_FILES = 256  # a pool is used from this many files, or from POOL_MIN_BYTES of input
POOL_MIN_BYTES = 48 << 20  # below both, worker start-up (~1 s each) costs more than it saves

Decoder = Callable[[str, int, bytes], tuple[np.ndarray, dict]]


def dicom_entry(path: str, size: int, salt: bytes) -> tuple[np.ndarray, dict]:
    """Default decoder: pixels plus header metadata, with the raw PatientID replaced by its salted key."""
    img, h = decode_with_header(path, size)
    meta = h.as_dict()
    pid, study = meta.pop("patient_id"), meta.pop("study_uid")
    # No PatientID and no study: a key of its own (by SOP UID or path), never one shared 'unknown' group.
    meta["patient_key"] = patient_key(pid, study or h.sop_uid or f"path:{path}", salt)
    return img, meta


def _work(decoder: Decoder, size: int, salt: bytes, item: tuple[int, str]):
    """Worker body: never raises, so one odd file cannot take down a pool of thousands."""
    i, path = item
    try:
        img, meta = decoder(path, size, salt)
        if img.shape != (size, size):
            return i, None, {}, "bad-dimensions", f"decoder returned {img.shape}"
        return i, to_uint16(img), meta, "", ""
    except SkipImage as exc:
        return i, None, {}, exc.reason, exc.detail
    except Exception as exc:  # noqa: BLE001 - report, do not crash the site
        return i, None, {}, "decode-failed", f"{type(exc).__name__}: {exc}"[:240]


def _worth_a_pool(paths: Sequence[str]) -> bool:
    if len(paths) >= POOL_MIN_FILES:
        return True
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += os.path.getsize(p)
    return total >= POOL_MIN_BYTES


def default_workers() -> int:
    """Decode worker processes: FEDRAD_DECODE_WORKERS, else up to 8 CPUs (1 = never use a pool)."""
    env = os.environ.get("FEDRAD_DECODE_WORKERS")
    return max(1, int(env)) if env else min(8, os.cpu_count() or 1)


def map_files(fn: Callable, items: Sequence, paths: Sequence[str], progress: bool = True, desc: str = "",
              workers: int | None = None) -> Iterator:
    """`fn(item)` for each item, in order, with a tqdm bar; a spawn process pool when the files are many
    or large (fn must be picklable and must not raise). Falls back to this process if the pool fails."""
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    bar = tqdm(total=len(items), desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        if workers > 1 and _worth_a_pool(paths):
            n = min(workers, max(1, len(items) // 8))
            try:
                with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as pool:
                    for res in pool.map(fn, items, chunksize=4):
                        done += 1
                        bar.update(1)
                        yield res
            except (BrokenProcessPool, OSError, RuntimeError, pickle.PicklingError) as exc:
                # e.g. __main__ not importable by spawn (stdin, notebooks): finish in this process.
                warnings.warn(f"decode pool failed ({type(exc).__name__}); continuing serially", stacklevel=2)
        for item in items[done:]:
            res = fn(item)
            bar.update(1)
            yield res
    finally:
        bar.close()


class DecodedCache:
    """Decode-once cache for one image size. `load(paths)` -> (images uint16 [N,S,S], kept, skipped).

    `decoder(path, size, salt) -> (float32 [S,S] in [0,1], json-able meta)` must be a module-level
    function (it may run in worker processes); the default decodes DICOM and records header fields.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], size: int, decoder: Decoder | None = None,
                 workers: int | None = None) -> None:
        self.root = Path(cache_dir)
        self.size = int(size)
        self.dir = self.root / f"s{self.size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.decoder: Decoder = decoder or dicom_entry
        self.decoder_name = f"{self.decoder.__module__}.{self.decoder.__qualname__}"
        self.salt = load_or_create_salt(self.root / "salt.bin")
        self.salt_id = hmac.new(self.salt, b"fedrad-salt-id", hashlib.sha256).hexdigest()[:12]
        self.workers = workers if workers is not None else default_workers()
        self.index_path = self.dir / "index.json"
        self._entries: dict[str, dict] = {}
        self.stats: dict[str, float] = {"decoded": 0, "reused": 0, "seconds": 0.0}

    # -- index -------------------------------------------------------------------------------------
    def _read_index(self) -> dict[str, dict]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if (data.get("version") != FORMAT_VERSION or data.get("size") != self.size
                or data.get("salt_id") != self.salt_id):
            return {}
        entries = data.get("entries", {})
        # A chunk that vanished (manual cleanup) invalidates the entries that pointed into it.
        chunks = {e["chunk"] for e in entries.values() if e.get("chunk")}
        missing = {c for c in chunks if not (self.dir / c).exists()}
        return {k: e for k, e in entries.items() if e.get("chunk") not in missing}

    def _write_index(self) -> None:
        payload = {"version": FORMAT_VERSION, "size": self.size, "salt_id": self.salt_id,
                   "entries": self._entries}
        atomic_write_bytes(self.index_path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))

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

    def _fresh(self, entry: dict | None, st: os.stat_result) -> bool:
        return (entry is not None and entry.get("file_size") == st.st_size
                and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("decoder") == self.decoder_name)

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

    # -- decode ------------------------------------------------------------------------------------
    def _decode(self, todo: list[tuple[int, str]], progress: bool) -> Iterator[tuple]:
        work = partial(_work, self.decoder, self.size, self.salt)
        yield from map_files(work, todo, [p for _, p in todo], progress=progress,
                             desc=f"decoding {self.size}px", workers=self.workers)

    def load(self, paths: Sequence[str | os.PathLike[str]], progress: bool = True,
             ) -> tuple[np.ndarray, list[int], dict[str, str]]:
        """Images for `paths` in order, decoding only new or changed files.

        Returns (images uint16 [len(kept), S, S], kept: indices into `paths` that decoded,
        skipped: {path as given: reason}). `entry(path)` gives the stored meta / skip detail.
        """
        t0 = time.perf_counter()
        given = [os.fspath(p) for p in paths]
        absolute = [os.path.abspath(p) for p in given]
        stats: list[os.stat_result | None] = []
        for p in absolute:
            try:
                stats.append(os.stat(p))
            except OSError:
                stats.append(None)
        with self._locked():
            self._entries = self._read_index()
            todo = [(i, p) for i, (p, st) in enumerate(zip(absolute, stats, strict=True))
                    if st is not None and not self._fresh(self._entries.get(p), st)]
            changed = bool(todo)
            if todo:
                results: dict[int, tuple] = {}
                ok: list[int] = []

                def fill(mm: np.ndarray) -> None:
                    row = 0
                    for i, img, meta, reason, detail in self._decode(todo, progress):
                        results[i] = (meta, reason, detail)
                        if img is not None:
                            mm[row] = img
                            ok.append(i)
                            row += 1

                # Decode straight into a chunk sized for the worst case, then keep only the good rows.
                tmp_name = self._new_chunk(len(todo), fill)
                chunk = tmp_name
                if len(ok) < len(todo):
                    src = self._chunk(tmp_name, len(todo))
                    chunk = self._new_chunk(len(ok), lambda mm: mm.__setitem__(slice(None), src[: len(ok)]))
                    del src
                    with contextlib.suppress(OSError):
                        (self.dir / tmp_name).unlink()
                rows = {i: r for r, i in enumerate(ok)}
                for i, _p in todo:
                    st = stats[i]
                    meta, reason, detail = results[i]
                    entry = {"file_size": st.st_size, "mtime_ns": st.st_mtime_ns, "decoder": self.decoder_name}
                    if i in rows:
                        entry.update(chunk=chunk, row=rows[i], meta=meta)
                    else:
                        entry.update(reason=reason, detail=detail)
                    self._entries[absolute[i]] = entry
                self.stats["decoded"] += len(todo)
            self.stats["reused"] += len(given) - len(todo)

            kept = [i for i, p in enumerate(absolute) if stats[i] is not None and "chunk" in self._entries[p]]
            skipped = {}
            for i, p in enumerate(absolute):
                if stats[i] is None:
                    skipped[given[i]] = "unreadable"
                elif "chunk" not in self._entries[p]:
                    skipped[given[i]] = self._entries[p].get("reason", "decode-failed")
            images, consolidated = self._gather([absolute[i] for i in kept])
            if changed or consolidated:
                self._write_index()
                self._gc()
        self.stats["seconds"] += time.perf_counter() - t0
        return images, kept, skipped

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

    def entry(self, path: str | os.PathLike[str]) -> dict | None:
        """The index entry for a path after `load`: `meta` for decoded files, `reason`/`detail` for skips."""
        return self._entries.get(os.path.abspath(os.fspath(path)))

    def meta(self, path: str | os.PathLike[str]) -> dict:
        e = self.entry(path)
        return dict(e.get("meta", {})) if e else {}
