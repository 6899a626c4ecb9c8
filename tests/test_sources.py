"""common/sources: the layout dispatch, the reader interface, the pixel budget and codec size parsers, and
the memory-limited decode workers (a worker that blows its memory or dies costs one file, not the site)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dicom_fixtures import shared_data, small_dicom
from hostile_dicom import j2k_stream, jpeg_stream

from fedrad.common.sources import REASONS, SkipImage, detect_source, open_source
from fedrad.common.sources.budget import (
    check_codec_size,
    check_pixel_budget,
    first_fragment,
    j2k_size,
    jpeg_size,
)
from fedrad.common.sources.errors import skip_from
from fedrad.common.sources.walk import display_name, walk_folder
from fedrad.common.sources.workers import map_isolated


def test_layout_dispatch_and_readers(tmp_path):
    small_dicom(tmp_path / "d" / "a" / "x.dcm")
    (tmp_path / "d" / "vol.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    (tmp_path / "d" / "scan.nii").write_bytes(b"\x00" * 348)
    (tmp_path / "d" / "notes.txt").write_text("hi")
    layout = detect_source(tmp_path / "d")
    assert layout.kind == "dicom" and layout.csv is None
    reader = open_source(tmp_path / "d")
    listing = reader.list_items()
    assert [it.item_id for it in listing.items] == ["a/x.dcm"]
    assert {p.path: p.reason for p in listing.skipped} == {"vol.nii.gz": "unsupported-format",
                                                            "scan.nii": "unsupported-format"}
    assert listing.ignored == ["notes.txt"] and listing.files_seen == 4
    img, meta = reader.decode(listing.items[0], 16, b"salt" * 8)
    assert img.shape == (16, 16) and "patient_id" not in meta and len(meta["patient_key"]) == 16

    (tmp_path / "p").mkdir()
    from PIL import Image

    Image.fromarray((np.arange(400).reshape(20, 20) % 255).astype(np.uint8)).save(tmp_path / "p" / "a.png")
    (tmp_path / "p" / "manifest.csv").write_text("image,patient_id\na.png,P1\nmissing.png,P2\n")
    layout = detect_source(tmp_path / "p")
    assert layout.kind == "images" and layout.csv.name == "manifest.csv"
    reader = open_source(tmp_path / "p")
    items = reader.list_items().items
    assert [it.item_id for it in items] == ["a.png", "missing.png"]
    assert reader.decode(items[0], 8)[0].shape == (8, 8)
    with pytest.raises(SkipImage) as exc:
        reader.decode(items[1], 8)
    assert exc.value.reason == "unreadable"


def test_png_over_budget_is_too_large_before_decoding(tmp_path):
    from PIL import Image

    from fedrad.common.sources.image_folder import image_entry

    Image.fromarray(np.arange(100 * 100, dtype=np.uint8).reshape(100, 100)).save(tmp_path / "a.png")
    with pytest.raises(SkipImage) as exc:
        image_entry(str(tmp_path / "a.png"), 8, b"", max_pixels=5000)
    assert exc.value.reason == "too-large"
    Image.fromarray(np.full((10, 10), 9, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(SkipImage) as exc:
        image_entry(str(tmp_path / "flat.png"), 8)
    assert exc.value.reason == "blank"


def test_pixel_budget_and_codec_headers():
    check_pixel_budget(4096, 4096)  # a 16 Mpixel film is fine
    for args in ((65535, 65535), (512, 512, 100000), (8192, 8192, 1, 3)):
        with pytest.raises(SkipImage) as exc:
            check_pixel_budget(*args)
        assert exc.value.reason == "too-large"
    with pytest.raises(SkipImage):
        check_pixel_budget(100, 100, max_pixels=9999)
    assert jpeg_size(jpeg_stream(300, 200)).__dict__ == {"codec": "jpeg", "width": 300, "height": 200,
                                                         "components": 1}
    assert jpeg_size(jpeg_stream(30, 20, 0xF7)).codec == "jpeg-ls"
    assert (j2k_size(j2k_stream(640, 480)).width, j2k_size(j2k_stream(640, 480)).height) == (640, 480)
    assert jpeg_size(b"\xff\xd8\xff") is None and j2k_size(b"") is None and jpeg_size(b"junk") is None
    with pytest.raises(SkipImage) as exc:
        check_codec_size("jpeg2000", j2k_stream(16384, 16384), 64, 64, 1, 16)
    assert exc.value.reason == "too-large"
    with pytest.raises(SkipImage) as exc:
        check_codec_size("jpeg", jpeg_stream(65, 64), 64, 64, 1, 8)
    assert exc.value.reason == "bad-dimensions"
    assert check_codec_size("jpeg", jpeg_stream(64, 64), 64, 64, 1, 8).width == 64
    from pydicom.encaps import encapsulate

    assert first_fragment(encapsulate([b"abcd"])) == b"abcd"
    assert first_fragment(b"\x00" * 20) == b""


def test_shared_files_pass_codec_checks():
    """The budget and codec checks must not reject any real file the decoders handle (10 syntaxes)."""
    from fedrad.common.dicom_io import check_dicom

    ok = 0
    for p in sorted((shared_data() / "dicom").glob("*.dcm")):
        try:
            check_dicom(p)
            ok += 1
        except SkipImage as exc:
            assert exc.reason in ("no-pixel-data",), (p.name, exc)
    assert ok == 13  # all but the one without pixel data (the KNOWNBAD one fails only when decoded)


def test_skip_from_maps_third_party_exceptions():
    from pydicom.errors import BytesLengthException

    assert skip_from(BytesLengthException("Expected total bytes to be an even multiple")).reason == "bad-dimensions"
    assert skip_from(MemoryError()).reason == "out-of-memory"
    assert skip_from(EOFError("x")).reason == "truncated"
    assert skip_from(ZeroDivisionError("x")).reason == "decode-failed"
    assert SkipImage("no-such-reason", "d").reason == "decode-failed"  # never an unlisted reason
    assert {"too-large", "out-of-memory", "blank", "unsupported-format", "decoder-crashed"} <= set(REASONS)


def test_walk_reports_loops_links_and_escapes_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.dcm").write_bytes(b"x")
    os.symlink("loop", tmp_path / "loop")
    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("..", tmp_path / "a" / "up")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / os.fsdecode(b"M\xfcller.dcm")).write_bytes(b"x")
    w = walk_folder(tmp_path)
    assert sorted(p.name for p in w.files) == sorted(["ok.dcm", os.fsdecode(b"M\xfcller.dcm")])
    assert {p.path: p.detail for p in w.problems} == {
        "loop": "symbolic link loop", "dangling": "dangling symbolic link",
        "fifo": "not a regular file (device, FIFO or socket)"}
    assert [f.path for f in w.folders] == ["a/up"]
    assert display_name(os.fsdecode(b"M\xfcller.dcm")) == "M\\xfcller.dcm"
    assert display_name("a\nb\x1b[31m\u202e.dcm") == "a\\x0ab\\x1b[31m\\u202e.dcm"
    assert display_name("Müller.dcm") == "Müller.dcm"


# -- worker isolation (module-level functions: they run in spawned workers) ----------------------------
def _alloc(item):
    if item == "bomb":
        try:
            block = np.ones(6 << 30, dtype=np.uint8)  # 6 GiB: over the worker's address-space limit
            return ("allocated", int(block[0]))
        except MemoryError:
            return ("memory-error", 0)
    return ("ok", 0)


def _die(item):
    if item == "poison":
        os._exit(139)  # what a segfaulting decoder looks like to the pool
    return item.upper()


def test_worker_memory_limit_turns_a_bomb_into_memory_error():
    out = list(map_isolated(_alloc, ["a", "bomb", "b"], lambda i, d: ("crashed", 0), workers=1, progress=False,
                            memory_limit=1 << 30))
    assert out[0] == ("ok", 0) and out[2] == ("ok", 0)
    assert out[1][0] in ("memory-error", "crashed")  # bounded either way; never 6 GiB resident


def test_worker_crash_costs_one_item():
    items = ["a", "b", "poison", "c", "d"]
    out = list(map_isolated(_die, items, lambda i, d: f"crashed:{i}", workers=2, progress=False))
    assert out == ["A", "B", "crashed:poison", "C", "D"]
