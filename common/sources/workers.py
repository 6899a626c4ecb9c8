"""Decode worker processes under an address-space limit, surviving a worker that dies on one file.

Decoders are C libraries fed hostile bytes. Each worker process runs with RLIMIT_AS set, so a decoder bug
(or a bomb the header checks missed) gets MemoryError or dies instead of swapping the hospital server to a
halt. A worker that dies takes its in-flight items with it; those are retried one at a time in a fresh
single-worker pool, so the one file that kills a worker is reported (`on_crash`) and every other file
still gets its result.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

DEFAULT_MEMORY_MB = 3072  # address space per decode worker: a 64 Mpixel film decodes in ~1.5 GB


def default_workers() -> int:
    """Decode worker processes: FEDRAD_DECODE_WORKERS, else up to 8 CPUs (0 = decode in this process)."""
    env = os.environ.get("FEDRAD_DECODE_WORKERS")
    return max(0, int(env)) if env else min(8, os.cpu_count() or 1)


def memory_limit_bytes() -> int:
    """Address-space limit of one decode worker: FEDRAD_DECODE_MEMORY_MB, else DEFAULT_MEMORY_MB."""
    mb = int(os.environ.get("FEDRAD_DECODE_MEMORY_MB") or DEFAULT_MEMORY_MB)
    return max(256, mb) << 20


def _limit_memory(limit: int) -> None:
    """Pool initializer: cap this worker's address space (soft and hard, so the decoder cannot raise it)."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RUST_BACKTRACE"] = "0"  # a panicking Rust decoder becomes one SkipImage, not 60 lines of stderr


def _ping() -> bool:
    return True


def _pool(n: int, limit: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"), initializer=_limit_memory,
                               initargs=(limit,))


def _solo(fn: Callable, item, limit: int):
    """Run one item in a fresh one-worker pool; raises BrokenProcessPool if the worker dies."""
    with _pool(1, limit) as pool:
        return pool.submit(fn, item).result()


def _pools_work(limit: int) -> bool:
    """Can a worker process run a trivial task here? (False: spawn itself is broken, not a file.)"""
    try:
        with _pool(1, limit) as pool:
            return pool.submit(_ping).result()
    except (BrokenProcessPool, OSError, RuntimeError, pickle.PicklingError):
        return False


def map_isolated(fn: Callable, items: Sequence, on_crash: Callable[[object, str], object],
                 workers: int | None = None, progress: bool = True, desc: str = "",
                 memory_limit: int | None = None) -> Iterator:
    """`fn(item)` for each item, yielded in order. fn must be picklable and must not raise.

    workers >= 1: spawn worker processes, each under RLIMIT_AS = `memory_limit`; an item whose worker dies
    yields `on_crash(item, detail)`. workers == 0: in this process, no isolation (tests, debugging).
    """
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    limit = memory_limit or memory_limit_bytes()
    bar = tqdm(total=len(items), desc=desc, unit="file", disable=None if progress else True,  # terminal only
               dynamic_ncols=True)
    try:
        if workers >= 1 and items:
            try:
                # a worker costs ~0.5-1 s to start: one per 8 items at most
                yield from _isolated(fn, items, on_crash, min(workers, max(1, len(items) // 8)), limit, bar)
                return
            except (OSError, pickle.PicklingError, _PoolsUnavailable) as exc:
                # e.g. __main__ not importable by spawn (stdin, notebooks): decode here, unisolated.
                warnings.warn(f"decode workers unavailable ({type(exc).__name__}); decoding in this process "
                              "without a memory limit", stacklevel=2)
        for item in items[bar.n:]:
            res = fn(item)
            bar.update(1)
            yield res
    finally:
        bar.close()


class _PoolsUnavailable(RuntimeError):
    """Worker processes cannot run here at all (not one file's fault)."""


def _isolated(fn: Callable, items: Sequence, on_crash: Callable, n: int, limit: int, bar) -> Iterator:
    results: dict[int, object] = {}
    pending = deque(range(len(items)))
    nxt = 0
    any_ok = False
    while pending:
        suspects: list[int] = []
        with _pool(n, limit) as pool:
            futures: dict[int, Future] = {}
            broken = False
            while (pending and not broken) or futures:
                while pending and not broken and len(futures) < 4 * n:
                    i = pending.popleft()
                    try:
                        futures[i] = pool.submit(fn, items[i])
                    except BrokenProcessPool:
                        pending.appendleft(i)
                        broken = True
                if not futures:
                    break
                wait(list(futures.values()), return_when=FIRST_COMPLETED)
                for i, f in list(futures.items()):
                    if not f.done():
                        continue
                    del futures[i]
                    try:
                        results[i] = f.result()
                        any_ok = True
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(i)
                if broken:  # the pool is dead: everything still in flight is a suspect
                    suspects.extend(futures)
                    futures.clear()
                while nxt in results:
                    bar.update(1)
                    yield results.pop(nxt)
                    nxt += 1
        if suspects and not any_ok and not _pools_work(limit):
            raise _PoolsUnavailable("a trivial task also killed its worker")
        for i in sorted(suspects):  # find the culprit(s): each suspect alone in a fresh worker
            try:
                results[i] = _solo(fn, items[i], limit)
            except BrokenProcessPool:
                results[i] = on_crash(items[i], "decode worker process died on this file")
            any_ok = True
        while nxt in results:
            bar.update(1)
            yield results.pop(nxt)
            nxt += 1
