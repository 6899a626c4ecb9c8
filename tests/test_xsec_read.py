"""Cross-sectional reading (issue 27): CT, MR, US, NM and PET files from the shared set, frame by frame.

Real files from `shared/data/dicom_xsec` (INDEX.csv says what each is) plus small synthetic objects for what
no real file shows: a corrupt frame, per-frame functional groups, a frame over the budget, Deflate.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import shared_data

from fedrad.common.cache import DecodedCache
from fedrad.common.dicom_io import Frames, SkipImage, decode_item, read_header
from fedrad.common.sources.base import Item


def _xsec() -> tuple[Path, list[dict[str, str]]]:
    root = shared_data() / "dicom_xsec"
    if not (root / "INDEX.csv").is_file():
        pytest.skip("shared dicom_xsec not found")
    with open(root / "INDEX.csv", newline="") as f:
        return root, list(csv.DictReader(f))


def _decodes(ts: str) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        return False


def test_every_shared_xsec_file_decodes_with_its_frames_and_modality():
    root, rows = _xsec()
    seen_photometric, seen_modality = set(), set()
    for row in rows:
        ts = row["transfer_syntax"] if row["transfer_syntax"][:1].isdigit() else "1.2.840.10008.1.2"  # RAW: no meta
        if not _decodes(ts):
            continue
        img, h = decode_item(root / row["file"], 32)
        frames = int(row["frames"])
        assert h.modality == row["modality"] and h.frames == frames, row["file"]
        if frames > 1:
            assert isinstance(img, Frames) and img.total == frames and len(img.index) == frames, row["file"]
            assert img.images.shape == (frames, 32, 32) and (img.images.std(axis=(1, 2)) > 0).all()
        else:
            assert img.shape == (32, 32) and 0 <= img.min() and img.max() <= 1 and img.std() > 0.01, row["file"]
        seen_photometric.add(row["photometric"])
        seen_modality.add(row["modality"])
    assert {"CT", "MR", "US", "NM", "PT"} <= seen_modality
    assert {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"} <= seen_photometric


def test_colour_models_of_one_image_agree_as_luminance():
    """US1 as RGB, YBR_RCT (J2K lossless) and YBR_ICT (J2K lossy): one picture, so about one luminance."""
    root, _ = _xsec()
    rgb = decode_item(root / "wg04_US1_UNCR_us_rgb_explicitLE.dcm", 64)[0]
    rct = decode_item(root / "wg04_US1_J2KR_us_ybr_rct_j2k_lossless.dcm", 64)[0]
    ict = decode_item(root / "wg04_US1_J2KI_us_ybr_ict_j2k_lossy.dcm", 64)[0]
    np.testing.assert_allclose(rct, rgb, atol=1 / 255 + 1e-6)  # lossless: the same RGB, the same Y
    assert np.abs(ict - rgb).mean() < 0.02
    # the palette image in two syntaxes: identical luminance
    a = decode_item(root / "pydicom_OBXXXX1A_us_palette_explicitLE.dcm", 64)[0]
    b = decode_item(root / "pydicom_OBXXXX1A_us_palette_rle.dcm", 64)[0]
    np.testing.assert_array_equal(a, b)


def test_enhanced_mr_frames_identical_across_transfer_syntaxes():
    root, _ = _xsec()
    ref = decode_item(root / "pydicom_emri_small_enhanced_mr_10frames_explicitLE.dcm", 32)[0]
    for name in ("explicitBE", "rle", "j2k_lossless", "jpegls_lossless"):
        path = root / f"pydicom_emri_small_enhanced_mr_10frames_{name}.dcm"
        if not _decodes(str(read_header(path).transfer_syntax)):
            continue
        np.testing.assert_array_equal(decode_item(path, 32)[0].images, ref.images)


def test_file_without_file_meta_reads_like_its_part10_copy():
    root, _ = _xsec()
    raw = decode_item(root / "egsnrc_phantom_ct_RAW_no_part10_header_implicitLE.dcm", 32)[0]
    series = root / "ct_series_egsnrc_phantom"
    same = [p.name for p in sorted(series.glob("*.dcm")) if np.array_equal(decode_item(p, 32)[0], raw)]
    assert len(same) == 1  # exactly one slice of the Part 10 copies has its pixels


def test_no_file_meta_with_compressed_pixels_is_a_clear_skip(tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("MR_small_RLE.dcm"))
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "bare.dcm", enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert (tmp_path / "bare.dcm").read_bytes()[128:132] != b"DICM"
    with pytest.raises(SkipImage) as exc:
        decode_item(tmp_path / "bare.dcm", 32)
    assert exc.value.reason == "unsupported-syntax" and "File Meta" in exc.value.detail


def test_deflated_explicit_vr_little_endian_is_read(tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = get_testdata_file("CT_small.dcm")
    ds = dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert os.path.getsize(tmp_path / "deflated.dcm") < os.path.getsize(src)
    img, h = decode_item(tmp_path / "deflated.dcm", 32)
    np.testing.assert_array_equal(img, decode_item(src, 32)[0])
    assert h.transfer_syntax == DeflatedExplicitVRLittleEndian


def _enhanced(path: Path, frames: int, rows: int = 16, corrupt: int | None = None) -> Path:
    """An enhanced CT with per-frame rescale and position; frame `corrupt` is a JPEG-LS stream cut short."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import RLELossless, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "E1", generate_uid(), generate_uid()
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = frames
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    from pydicom.pixels.encoders.base import RLELosslessEncoder

    encoded = []
    for k in range(frames):
        g, pos, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, 2.5 * k]
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024 * (k % 2), "HU"
        g.PlanePositionSequence, g.PixelValueTransformationSequence = Sequence([pos]), Sequence([pvt])
        per.append(g)
        arr = ((np.arange(rows * rows) * (k + 1)) % 3000).astype(np.uint16).reshape(rows, rows)
        frame = RLELosslessEncoder.encode(arr, encoding_plugin="pydicom", rows=rows, columns=rows,
                                          samples_per_pixel=1, bits_allocated=16, bits_stored=16,
                                          pixel_representation=0, photometric_interpretation="MONOCHROME2",
                                          number_of_frames=1)
        encoded.append(frame[:20] if k == corrupt else frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(path, enforce_file_format=True)
    return path


def test_corrupt_frame_costs_that_frame_and_groups_apply_per_frame(tmp_path):
    frames, h = decode_item(_enhanced(tmp_path / "e.dcm", 5, corrupt=2), 16)
    assert frames.index == [0, 1, 3, 4] and [k for k, *_ in frames.skipped] == [2]
    assert [m["position"][2] for m in frames.metas] == [0.0, 2.5, 7.5, 10.0]
    assert frames.metas[0]["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] == h.orientation


def test_cache_keys_each_frame_and_reuses_them(tmp_path):
    path = _enhanced(tmp_path / "e.dcm", 4, corrupt=1)
    cache = DecodedCache(tmp_path / "cache", 16, workers=0)
    images, frames, skipped = cache.load_frames([Item("e.dcm", str(path))], progress=False)
    assert [f.item_id for f in frames] == ["e.dcm#0", "e.dcm#2", "e.dcm#3"] and list(skipped) == ["e.dcm#1"]
    assert images.shape == (3, 16, 16)
    assert [f.fingerprint[-3:] for f in frames] == ["#f0", "#f2", "#f3"]
    assert cache.meta("e.dcm#2")["position"] == [0.0, 0.0, 5.0] and cache.meta("e.dcm#2")["modality"] == "CT"
    again = DecodedCache(tmp_path / "cache", 16, workers=0)
    images2, frames2, _ = again.load_frames([Item("moved.dcm", str(path))], progress=False)
    assert again.stats["decoded"] == 0 and [f.item_id for f in frames2] == ["moved.dcm#0", "moved.dcm#2", "moved.dcm#3"]
    np.testing.assert_array_equal(np.asarray(images2), np.asarray(images))
    _img, kept, _ = again.load_items([Item("moved.dcm", str(path))], progress=False)
    assert kept == [0, 0, 0]  # load_items: the item's index once per usable frame


def test_frame_over_budget_and_too_many_frames_are_too_large(tmp_path):
    path = _enhanced(tmp_path / "e.dcm", 3, rows=32)
    with pytest.raises(SkipImage) as exc:
        decode_item(path, 16, max_pixels=32 * 31)
    assert exc.value.reason == "too-large"
    assert isinstance(decode_item(path, 16, max_pixels=32 * 32)[0], Frames)  # the budget is per frame
