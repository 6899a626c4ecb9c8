"""`fedrad ingest` quick pass and `--compact` (issue 26): the folder memo, `--full`, compaction and its lock."""

from __future__ import annotations

import os
import sqlite3
import time

import numpy as np
import pytest
from dicom_fixtures import small_dicom

from fedrad.client.site.ingest import ingest_site
from fedrad.client.site.site_data import load_site
from fedrad.common import cache as cache_mod
from fedrad.common.cache import DecodedCache
from fedrad.common.sources.dicom_folder import DicomFolderReader
from fedrad.common.store_compact import CompactRefused, compact_store
from fedrad.deploy.cli import main


def _site(folder, n, per_dir=10, start=0):
    for i in range(start, start + n):
        small_dicom(folder / f"s{i // per_dir}" / f"img{i:04d}.dcm", rows=24 + i % 3, cols=24, patient_id=f"P{i % 7}")
    return folder


def _run(tmp_path, **kw):
    return ingest_site(tmp_path / "data", 16, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                       progress=False, workers=0, **kw)


def test_quick_pass_lists_only_changed_folders_and_a_changed_folder_is_rescanned(tmp_path):
    _site(tmp_path / "data", 30)
    first = _run(tmp_path)
    assert first["full_pass"] == 1 and first["decoded"] == 30
    again = _run(tmp_path)  # nothing changed: no file of the three folders is stat'ed or looked up
    assert again["full_pass"] == 0 and again["files"] == 0 and again["folders_unchanged"] == 4  # root + s0..s2
    small_dicom(tmp_path / "data" / "s1" / "new.dcm", rows=30, cols=24, patient_id="PN")
    quick = _run(tmp_path)
    assert quick["full_pass"] == 0 and quick["files"] == 11 and quick["decoded"] == 1
    assert quick["stored_before"] == 10 and quick["folders_unchanged"] == 3
    site = load_site(tmp_path / "data", 16, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                     progress=False, max_decode=0)
    assert len(site) == 31 and site.pending == 0


def test_a_file_hidden_from_the_folder_memo_is_found_by_full(tmp_path, capsys):
    data = _site(tmp_path / "data", 20)
    _run(tmp_path)
    folder = data / "s0"
    st = os.stat(folder)
    small_dicom(folder / "sneaky.dcm", rows=28, cols=24, patient_id="PS")
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))  # the folder looks unchanged (same mtime and inode)
    assert _run(tmp_path)["decoded"] == 0  # the quick pass trusts the memo: documented, `--full` is the cure
    assert main(["ingest", str(data), "--cache", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state"),
                 "--image-size", "16", "--quiet", "--full"]) == 0
    out = capsys.readouterr().out
    assert "(full pass)" in out and "1 decoded now, 20 already stored" in out


def test_a_quick_pass_turns_full_when_the_last_full_pass_is_old(tmp_path):
    _site(tmp_path / "data", 10)
    _run(tmp_path)
    db = sqlite3.connect(tmp_path / "cache" / "s16" / "index.sqlite")
    db.execute("UPDATE info SET v = ? WHERE k = 'full_pass'", (repr(time.time() - 25 * 3600),))
    db.commit()
    db.close()
    out = _run(tmp_path)
    assert out["full_pass"] == 1 and out["files"] == 10 and out["stored_before"] == 10
    assert _run(tmp_path)["full_pass"] == 0  # and that full pass renewed the memo


def _chunk_files(store):
    return {p.name for p in store.glob("chunk-*")}


def test_compaction_keeps_every_live_image_and_frees_the_rows_of_deleted_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "BATCH", 8)  # several chunks, so some are partly dead
    data = _site(tmp_path / "data", 40)
    cache, state, store = tmp_path / "cache", tmp_path / "state", tmp_path / "cache" / "s16"
    _run(tmp_path)
    before = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    pixels = {p: np.asarray(before.images[i]) for i, p in enumerate(before.paths)}
    del before  # its lazy view holds the store: compaction would be refused
    gone = sorted(data.rglob("*.dcm"))[3:40:3]  # 13 files, spread over every chunk
    for p in gone:
        p.unlink()
    inodes = {p.name: p.stat().st_ino for p in store.glob("chunk-*")}
    out = compact_store(cache, 16, DicomFolderReader(data), state_dir=state)
    assert out["rows_dropped"] == 13 and out["entries_dropped"] == 13 and out["files_forgotten"] == 13
    assert out["bytes_freed"] == 13 * 16 * 16 * 2 and out["chunks_rewritten"] + out["chunks_dropped"] >= 1
    db = sqlite3.connect(store / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert {r[0] for r in db.execute("SELECT name FROM chunks")} == _chunk_files(store)  # no orphan, none missing
    assert db.execute("SELECT SUM(rows) FROM chunks").fetchone()[0] == 27
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 27
    untouched = {n for n in inodes if n in _chunk_files(store)}
    assert all((store / n).stat().st_ino == inodes[n] for n in untouched)  # a chunk with no dead row is kept
    db.close()
    after = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    assert len(after) == 27 and after.pending == 0
    for i, p in enumerate(after.paths):
        np.testing.assert_array_equal(np.asarray(after.images[i]), pixels[p])
    del after
    again = compact_store(cache, 16, DicomFolderReader(data), state_dir=state)
    assert again["rows_dropped"] == 0 and again["chunks_rewritten"] == 0  # nothing left to free
    assert _run(tmp_path, full=True)["decoded"] == 0  # the live files are still stored


def test_compaction_is_refused_while_a_round_or_an_ingest_uses_the_store(tmp_path, capsys):
    data = _site(tmp_path / "data", 12)
    cache, state = tmp_path / "cache", tmp_path / "state"
    _run(tmp_path)
    (data / "s0" / "img0000.dcm").unlink()
    args = ["ingest", str(data), "--cache", str(cache), "--state-dir", str(state), "--image-size", "16", "--quiet",
            "--compact"]
    user = DecodedCache(cache, 16, workers=0, state_dir=state)  # another ingest, or a round planning its load
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use" in err and "Traceback" not in err
    user.close()
    site = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    if not isinstance(site.images, np.memmap):  # a round's lazy view reads chunks as it trains: it holds the store
        with pytest.raises(CompactRefused):
            compact_store(cache, 16, DicomFolderReader(data), state_dir=state)
    del site
    assert main(args) == 0
    assert "1 images of deleted files dropped" in capsys.readouterr().out


def test_compaction_killed_mid_rewrite_leaves_a_consistent_store(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "BATCH", 8)
    data = _site(tmp_path / "data", 24)
    cache, state, store = tmp_path / "cache", tmp_path / "state", tmp_path / "cache" / "s16"
    _run(tmp_path)
    before = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    pixels = {p: np.asarray(before.images[i]) for i, p in enumerate(before.paths)}
    del before
    for p in sorted(data.rglob("*.dcm"))[::4]:
        p.unlink()
    real_tx, calls = DecodedCache._tx, []

    def dying_tx(self, db=None):
        calls.append(1)
        if len(calls) == 2:  # the first chunk's rewrite: its new chunk is renamed in, never committed
            raise KeyboardInterrupt("killed")
        return real_tx(self, db)

    monkeypatch.setattr(DecodedCache, "_tx", dying_tx)
    with pytest.raises(KeyboardInterrupt):
        compact_store(cache, 16, DicomFolderReader(data), state_dir=state)
    monkeypatch.setattr(DecodedCache, "_tx", real_tx)
    DecodedCache(cache, 16, workers=0, state_dir=state).close()  # the next open deletes the orphan chunk
    db = sqlite3.connect(store / "index.sqlite")
    assert {r[0] for r in db.execute("SELECT name FROM chunks")} == _chunk_files(store)
    db.close()
    after = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    assert len(after) == 18
    for i, p in enumerate(after.paths):
        np.testing.assert_array_equal(np.asarray(after.images[i]), pixels[p])
    del after
    assert compact_store(cache, 16, DicomFolderReader(data), state_dir=state)["rows_dropped"] == 6


def test_a_lazy_view_pickles_for_spawned_ranks_and_holds_the_store_there_too(tmp_path):
    import pickle

    from fedrad.common.store_view import hold_store

    data = _site(tmp_path / "data", 12)
    _run(tmp_path)
    (data / "s0" / "img0000.dcm").unlink()
    site = load_site(data, 16, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", progress=False,
                     max_decode=0)
    view = site.images
    if isinstance(view, np.memmap):
        pytest.skip("the rows are one whole chunk: no lazy view")
    expected = np.asarray(view[[0, 5, 10]])
    del site
    copy = pickle.loads(pickle.dumps(view))
    del view
    np.testing.assert_array_equal(copy[[0, 5, 10]], expected)
    assert hold_store(tmp_path / "cache" / "s16", exclusive=True) is None  # the copy holds the store
    del copy
    lock = hold_store(tmp_path / "cache" / "s16", exclusive=True)
    assert lock is not None
    lock.close()
