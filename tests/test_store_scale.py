"""The decoded store at scale (issue 26): SQLite index, append-only chunks, lazy views, pending, faults."""

from __future__ import annotations

import os
import sqlite3
import stat

import numpy as np
from dicom_fixtures import small_dicom

from fedrad.common.cache import DecodedCache, dicom_entry
from fedrad.common.sources.base import Item
from fedrad.common.store_view import StoreView


def _files(folder, n, start=0):
    return [str(small_dicom(folder / f"img{i:03d}.dcm", rows=24 + i % 5, cols=20 + i % 7, patient_id=f"P{i}"))
            for i in range(start, start + n)]


def _chunks(store):
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in store.iterdir() if p.name.startswith("chunk-")}


def test_adding_a_file_appends_one_chunk_and_never_copies_stored_images(tmp_path):
    paths = _files(tmp_path / "d", 6)
    first, _, _ = DecodedCache(tmp_path / "c", 16, workers=0).load(paths, progress=False)
    store = tmp_path / "c" / "s16"
    before = _chunks(store)
    new = _files(tmp_path / "d", 1, start=6)
    c = DecodedCache(tmp_path / "c", 16, workers=0)
    imgs, kept, _ = c.load([*paths, *new], progress=False)
    after = _chunks(store)
    assert c.stats["decoded"] == 1 and len(after) == 2
    assert all(after[name] == old for name, old in before.items())  # same inode, same bytes: nothing rewritten
    (added,) = set(after) - set(before)
    assert len(after[added][1]) == 16 * 16 * 2  # the new chunk holds exactly the one new image
    assert isinstance(imgs, StoreView) and imgs.shape == (7, 16, 16) and len(imgs) == 7
    np.testing.assert_array_equal(np.asarray(imgs[:6]), np.asarray(first))
    np.testing.assert_array_equal(imgs[[6, 0]][1], np.asarray(first)[0])
    np.testing.assert_array_equal(imgs[6], dicom_entry(new[0], 16, c.salt)[0].__mul__(65535).round())


def test_store_files_are_private(tmp_path):
    paths = _files(tmp_path / "d", 2)
    DecodedCache(tmp_path / "c", 16, workers=0).load(paths, progress=False)
    store = tmp_path / "c" / "s16"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
    for p in store.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


def test_a_round_leaves_many_new_files_pending_and_uses_what_is_stored(tmp_path):
    paths = _files(tmp_path / "d", 5)
    DecodedCache(tmp_path / "c", 16, workers=0).load(paths[:2], progress=False)
    items = [Item(os.path.basename(p), p) for p in paths]
    c = DecodedCache(tmp_path / "c", 16, workers=0)
    imgs, kept, skipped = c.load_frames(items, progress=False, max_decode=2)
    assert c.pending == 3 and c.stats["decoded"] == 0 and len(imgs) == 2 and not skipped
    assert [it.item_id for it in kept] == ["img000.dcm", "img001.dcm"]
    imgs, kept, _ = c.load_frames(items, progress=False, max_decode=3)  # few enough: decoded inline
    assert c.pending == 0 and c.stats["decoded"] == 3 and len(imgs) == 5


def test_format_3_leftovers_are_removed_and_decoded_again(tmp_path):
    store = tmp_path / "c" / "s16"
    store.mkdir(parents=True)
    (store / "index.json").write_text('{"version": 3}')
    (store / "chunk-0123456789abcdef.u16").write_bytes(b"\0" * 512)
    paths = _files(tmp_path / "d", 2)
    c = DecodedCache(tmp_path / "c", 16, workers=0)
    assert not (store / "index.json").exists() and not (store / "chunk-0123456789abcdef.u16").exists()
    c.load(paths, progress=False)
    assert c.stats["decoded"] == 2


GROWN: list[str] = []


def _grows_while_read(path: str, size: int, salt: bytes):
    """Module-level decoder: a scanner still writing the file (it grows once, while it is decoded)."""
    out = dicom_entry(path, size, salt)
    if "grow" in path and path not in GROWN:
        GROWN.append(path)
        with open(path, "ab") as f:
            f.write(b"\0" * 16)
    return out


def test_a_file_that_changes_while_read_is_not_stored_and_is_decoded_next_time(tmp_path):
    paths = _files(tmp_path / "d", 2)
    grow = str(small_dicom(tmp_path / "d" / "grow.dcm", rows=20, cols=20))
    c = DecodedCache(tmp_path / "c", 16, decoder=_grows_while_read, workers=0)
    imgs, kept, skipped = c.load([*paths, grow], progress=False)
    assert kept == [0, 1] and skipped == {grow: "unreadable"} and c.stats["changed"] == 1
    db = sqlite3.connect(tmp_path / "c" / "s16" / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2  # nothing stored for the moving file
    again = DecodedCache(tmp_path / "c", 16, decoder=_grows_while_read, workers=0)  # it has stopped changing
    imgs, kept, skipped = again.load([*paths, grow], progress=False)
    assert kept == [0, 1, 2] and not skipped and again.stats["decoded"] == 1


def test_a_full_disk_fails_clearly_and_leaves_the_store_consistent(tmp_path, monkeypatch):
    from fedrad.common import cache as cache_mod

    paths = _files(tmp_path / "d", 5)
    monkeypatch.setattr(cache_mod, "BATCH", 2)
    DecodedCache(tmp_path / "c", 16, workers=0).load(paths[:2], progress=False)
    real = cache_mod._Batch.write
    calls = []

    def full(self, img):
        calls.append(1)
        if len(calls) > 2:  # the second new batch hits a full disk
            raise OSError(28, "No space left on device")
        return real(self, img)

    monkeypatch.setattr(cache_mod._Batch, "write", full)
    try:
        DecodedCache(tmp_path / "c", 16, workers=0).load(paths, progress=False)
        raise AssertionError("a full disk must fail the load")
    except OSError as exc:
        assert exc.errno == 28
    monkeypatch.undo()
    store = tmp_path / "c" / "s16"
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]
    c = DecodedCache(tmp_path / "c", 16, workers=0)
    imgs, kept, _ = c.load(paths, progress=False)
    assert kept == [0, 1, 2, 3, 4] and c.stats["decoded"] == 1  # the batch committed before the failure is kept


def _without_volatile(report: dict) -> dict:
    drop = {"seconds", "decodes_reused", "files_per_second", "images_per_second"}
    return {k: v for k, v in report.items() if k not in drop and "second" not in k}


def test_a_second_scan_of_an_unchanged_folder_decodes_nothing(tmp_path, monkeypatch):
    from dicom_fixtures import make_corrupt_files

    from fedrad.client.site.scan import scan_folder

    monkeypatch.setenv("FEDRAD_DECODE_WORKERS", "0")
    data = tmp_path / "d"
    _files(data, 4)
    make_corrupt_files(data / "bad")
    first = scan_folder(data, progress=False, cache_dir=tmp_path / "c")
    assert first["decodes_reused"] == 0
    decoded = []
    from fedrad.common.sources import dicom_folder

    real = dicom_folder.DicomFolderReader.entry

    def counting(locator, size, salt, max_pixels=1 << 26):
        decoded.append(locator)
        return real(locator, size, salt, max_pixels)

    monkeypatch.setattr(dicom_folder.DicomFolderReader, "entry", staticmethod(counting))
    second = scan_folder(data, progress=False, cache_dir=tmp_path / "c")
    assert decoded == [] and second["decodes_reused"] == first["candidates"]
    assert _without_volatile(second) == _without_volatile(first)
    small_dicom(data / "img000.dcm", rows=30, cols=30)  # a changed file is decoded again, alone
    os.utime(data / "img000.dcm", ns=(1, 10**18))
    third = scan_folder(data, progress=False, cache_dir=tmp_path / "c")
    assert decoded == [str(data / "img000.dcm")] and third["decodes_reused"] == first["candidates"] - 1
