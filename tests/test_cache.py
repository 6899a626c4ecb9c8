"""DecodedCache: decode once, reuse, refresh changed files, remember skips, atomic files."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
from dicom_fixtures import make_corrupt_files, shared_data, small_dicom

from fedrad.common import cache as cache_mod
from fedrad.common.cache import DecodedCache, dicom_entry
from fedrad.common.dicom_io import decode_dicom

CALLS: list[str] = []


def counting_entry(path: str, size: int, salt: bytes):
    """Module-level (picklable) decoder that records each call."""
    CALLS.append(path)
    return dicom_entry(path, size, salt)


def _folder(tmp_path, n=4):
    d = tmp_path / "data"
    paths = [str(small_dicom(d / f"img{i}.dcm", rows=40, cols=30 + i, patient_id=f"P{i % 2}")) for i in range(n)]
    expected = make_corrupt_files(d / "bad")
    return paths + [str(d / "bad" / n) for n in sorted(expected)], expected


def test_second_load_does_not_decode(tmp_path):
    CALLS.clear()
    paths, expected = _folder(tmp_path)
    c1 = DecodedCache(tmp_path / "cache", 32, decoder=counting_entry, workers=0)
    imgs, kept, skipped = c1.load(paths, progress=False)
    assert imgs.shape == (4, 32, 32) and imgs.dtype == np.uint16 and kept == [0, 1, 2, 3]
    assert {os.path.basename(p): r for p, r in skipped.items()} == expected
    assert len(CALLS) == len(paths)
    np.testing.assert_allclose(imgs[1] / 65535.0, decode_dicom(paths[1], 32), atol=1 / 65535)

    CALLS.clear()
    c2 = DecodedCache(tmp_path / "cache", 32, decoder=counting_entry, workers=0)
    imgs2, kept2, skipped2 = c2.load(paths, progress=False)
    assert CALLS == []  # neither good nor corrupt files are decoded again
    assert kept2 == kept and skipped2 == skipped and np.array_equal(np.asarray(imgs2), np.asarray(imgs))
    assert c2.stats["decoded"] == 0 and c2.stats["reused"] == len(paths)
    assert c2.meta(paths[0])["patient_key"] == c1.meta(paths[0])["patient_key"]
    assert "patient_id" not in c2.meta(paths[0])  # raw IDs never stored in the cache index
    assert c2.entry(skipped2 and next(iter(skipped2)))["detail"]


def test_changed_and_new_files_refresh(tmp_path):
    CALLS.clear()
    paths, _ = _folder(tmp_path, n=3)
    DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0).load(paths, progress=False)
    again = DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0)
    before = np.array(again.load(paths, progress=False)[0][0])
    small_dicom(tmp_path / "data" / "img0.dcm", rows=40, cols=29)  # rewrite: new content
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    new = str(small_dicom(tmp_path / "data" / "new.dcm", rows=20, cols=20))
    CALLS.clear()
    c = DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0)
    imgs, kept, _ = c.load([*paths, new], progress=False)
    assert sorted(CALLS) == sorted([paths[0], new])
    assert imgs.shape[0] == 4 and not np.array_equal(imgs[0], before)
    # append-only: the first chunk is kept byte for byte, the two new images are one new chunk, no temp files
    files = sorted(p.name for p in (tmp_path / "c" / "s32").iterdir())
    assert len([f for f in files if f.startswith("chunk-")]) == 2
    assert not [f for f in files if f.endswith(".tmp")]
    db = sqlite3.connect(tmp_path / "c" / "s32" / "index.sqlite")
    assert sorted(r[0] for r in db.execute("SELECT rows FROM chunks")) == [2, 3]
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == len(paths) + 2  # old content kept


def test_sizes_are_separate_and_subset_order(tmp_path):
    paths, _ = _folder(tmp_path, n=3)
    a, _, _ = DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:3], progress=False)
    b, _, _ = DecodedCache(tmp_path / "c", 16, workers=1).load(paths[:3], progress=False)
    assert a.shape == (3, 32, 32) and b.shape == (3, 16, 16)
    rev, kept, _ = DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:3][::-1], progress=False)
    assert np.array_equal(np.asarray(rev), np.asarray(a)[::-1])
    mine = np.asarray(rev)
    mine[0] = 0  # callers get copies: writing them never touches the store
    again, _, _ = DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:3], progress=False)
    assert np.array_equal(np.asarray(again), np.asarray(a))


def _stored(folder):
    db = sqlite3.connect(folder / "index.sqlite")
    return sorted(db.execute("SELECT key, e FROM entries")), sorted(db.execute("SELECT * FROM chunks"))


def test_atomic_write_leaves_old_index_on_failure(tmp_path, monkeypatch):
    paths, _ = _folder(tmp_path, n=2)
    DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:1], progress=False)
    index = tmp_path / "c" / "s32" / "index.sqlite"
    old = _stored(index.parent)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", boom)
    try:
        DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:2], progress=False)
    except OSError:
        pass
    monkeypatch.undo()
    assert _stored(index.parent) == old  # never a torn or half-written index
    assert not [p for p in index.parent.iterdir() if p.name.endswith(".tmp")]
    imgs, kept, _ = DecodedCache(tmp_path / "c", 32, workers=1).load(paths[:2], progress=False)
    assert imgs.shape[0] == 2


def test_cache_on_shared_data_reuses(tmp_path):
    files = sorted(str(p) for p in (shared_data() / "dicom").glob("*.dcm"))
    imgs, kept, skipped = DecodedCache(tmp_path / "c", 32).load(files, progress=False)
    assert len(kept) == 12 and sorted(skipped.values()) == ["decode-failed", "no-pixel-data"]
    c = DecodedCache(tmp_path / "c", 32)
    imgs2, kept2, _ = c.load(files, progress=False)
    assert c.stats["decoded"] == 0 and np.array_equal(np.asarray(imgs), np.asarray(imgs2))


def test_moving_the_folder_does_not_decode_again(tmp_path):
    """Entries are keyed by content: a renamed/moved site folder costs a hash, not a decode."""
    CALLS.clear()
    paths, _ = _folder(tmp_path, n=3)
    c1 = DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0)
    imgs, kept, skipped = c1.load(paths, progress=False)
    keys = [c1.meta(p)["patient_key"] for p in paths[:3]]
    os.rename(tmp_path / "data", tmp_path / "moved")
    moved = [p.replace(str(tmp_path / "data"), str(tmp_path / "moved")) for p in paths]
    CALLS.clear()
    c2 = DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0)
    imgs2, kept2, skipped2 = c2.load(moved, progress=False)
    assert CALLS == [] and c2.stats["decoded"] == 0 and c2.stats["hashed"] == len(moved)
    assert kept2 == kept and np.array_equal(np.asarray(imgs2), np.asarray(imgs))
    assert [c2.meta(p)["patient_key"] for p in moved[:3]] == keys  # salted keys unchanged
    assert sorted(skipped2.values()) == sorted(skipped.values())
    # and a third load at the new place neither hashes nor decodes
    c3 = DecodedCache(tmp_path / "c", 32, decoder=counting_entry, workers=0)
    c3.load(moved, progress=False)
    assert CALLS == [] and c3.stats["hashed"] == 0


def test_default_workers_decode_in_isolated_processes(tmp_path):
    paths, expected = _folder(tmp_path, n=2)
    imgs, kept, skipped = DecodedCache(tmp_path / "c", 32, workers=2).load(paths, progress=False)
    assert kept == [0, 1] and {os.path.basename(p): r for p, r in skipped.items()} == expected


def test_budget_skip_is_rejudged_when_the_budget_changes(tmp_path):
    paths, _ = _folder(tmp_path, n=2)
    small = DecodedCache(tmp_path / "c", 32, workers=0, max_pixels=100)
    _, kept, skipped = small.load(paths[:2], progress=False)
    assert kept == [] and set(skipped.values()) == {"too-large"}
    assert "budget" in small.entry(paths[0])["detail"]
    again = DecodedCache(tmp_path / "c", 32, workers=0)
    _, kept, _ = again.load(paths[:2], progress=False)
    assert kept == [0, 1] and again.stats["decoded"] == 2


OOM_ONCE: list[str] = []


def out_of_memory_once(path: str, size: int, salt: bytes):
    """Module-level decoder: the first call for a file runs out of memory, later ones decode."""
    if path not in OOM_ONCE:
        OOM_ONCE.append(path)
        raise MemoryError
    return dicom_entry(path, size, salt)


def test_out_of_memory_is_reported_and_retried_at_the_next_load_not_cached(tmp_path):
    """Running out of memory says as much about the machine as about the file: the image is skipped this
    time (reason out-of-memory, not too-large) and decoded at the next load, not skipped for ever."""
    paths, _ = _folder(tmp_path, n=2)
    OOM_ONCE.clear()
    first = DecodedCache(tmp_path / "c", 32, decoder=out_of_memory_once, workers=0)
    _, kept, skipped = first.load(paths[:2], progress=False)
    assert kept == [] and set(skipped.values()) == {"out-of-memory"}
    again = DecodedCache(tmp_path / "c", 32, decoder=out_of_memory_once, workers=0)
    imgs, kept, skipped = again.load(paths[:2], progress=False)
    assert kept == [0, 1] and skipped == {} and again.stats["decoded"] == 2 and len(imgs) == 2


def test_an_opener_waiting_to_claim_a_new_store_keeps_what_another_stored_meanwhile(tmp_path, monkeypatch):
    """Two messages open a new store at once: both see it is not theirs yet; the one that waits for the lock
    must not wipe what the first claimed and stored meanwhile (it would be decoded again)."""
    import contextlib

    CALLS.clear()
    paths, _ = _folder(tmp_path)
    real_locked = DecodedCache._locked
    first_done = []

    @contextlib.contextmanager
    def locked(self):
        if not first_done:  # the second opener, about to claim: the first claims the store and stores first
            first_done.append(True)
            other = DecodedCache(tmp_path / "cache", 32, decoder=counting_entry, workers=0)
            other.load(paths, progress=False)
            other.close()
        with real_locked(self):
            yield

    monkeypatch.setattr(DecodedCache, "_locked", locked)
    second = DecodedCache(tmp_path / "cache", 32, decoder=counting_entry, workers=0)
    assert first_done and len(CALLS) == len(paths)
    imgs, kept, _ = second.load(paths, progress=False)
    assert len(CALLS) == len(paths) and kept == [0, 1, 2, 3]  # nothing decoded twice
    second.close()
