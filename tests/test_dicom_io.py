"""DICOM decoding on real files (shared data, pydicom's bundled files) and corrupt inputs; header signals."""

from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest
from dicom_fixtures import dicom_index, make_corrupt_files, shared_data, small_dicom

from fedrad.common.dicom_io import REASONS, Frames, SkipImage, check_dicom, decode_dicom, decode_item, read_header
from fedrad.common.header_signals import age_bucket, load_or_create_salt, parse_age, patient_key
from fedrad.common.image_ops import fit_square

SIZE = 48


def _rows():
    try:
        return dicom_index()
    except pytest.skip.Exception:
        return []


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if not p:
        pytest.skip(f"pydicom test file {name} not available offline")
    return p


# -- real shared data ------------------------------------------------------------------------------
@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["file"][:40])
def test_shared_file_decodes_or_skips_with_reason(row):
    path = shared_data() / "dicom" / row["file"]
    h = read_header(path)
    assert (h.modality, h.photometric, h.transfer_syntax) == (row["modality"], row["photometric"],
                                                               row["transfer_syntax"])
    assert (h.bits_stored, h.rows, h.cols) == (int(row["bits_stored"]), int(row["rows"]), int(row["cols"]))
    assert h.patient_id  # every file has one (INDEX: patient_id_present)
    if row["decoders_ok"].startswith("none"):
        with pytest.raises(SkipImage) as exc:
            decode_dicom(path, SIZE)
        expected = "no-pixel-data" if row["pixel_data"] == "0" else "decode-failed"
        assert exc.value.reason == expected and exc.value.detail
        return
    img = decode_dicom(path, SIZE)
    assert img.shape == (SIZE, SIZE) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.05  # a real radiograph, not a blank or a clipped window


def test_monochrome1_is_inverted_siim_pair():
    d = shared_data() / "dicom"
    mono2 = decode_dicom(d / "siim_cr_chest_pa_mono2_8bit_jpegbaseline.dcm", 64)
    mono1 = decode_dicom(d / "siim_fake_monochrome1_8bit_jpegbaseline.dcm", 64)
    assert np.abs(mono1 - (1.0 - mono2)).max() < 0.02
    assert abs(mono2.mean() - 0.5) > 0.05  # so the check above is not trivially about a 0.5-grey image


@pytest.mark.parametrize("files", [
    ("wg04_RG2_JPLL_cr_hip_mono2_10bit_jpeglossless_sv1.dcm", "wg04_RG2_JLSL_cr_hip_mono2_10bit_jpegls_lossless.dcm",
     "derived_RG2_cr_hip_mono2_10bit_rle_lossless.dcm"),
    ("wg04_RG3_J2KR_cr_extremity_mono1_10bit_j2k_lossless.dcm",
     "derived_RG3_cr_extremity_mono1_10bit_uncompressed_explicitLE.dcm"),
])
def test_lossless_codecs_agree(files):
    """Same pixels in different lossless syntaxes (JPEG lossless, JPEG-LS, RLE, J2K, raw) decode identically."""
    d = shared_data() / "dicom"
    imgs = [decode_dicom(d / f, SIZE) for f in files]
    for other in imgs[1:]:
        np.testing.assert_allclose(other, imgs[0], atol=1e-6)


def test_aspect_kept_and_zero_padded():
    img = decode_dicom(shared_data() / "dicom" / "wg04_RG2_JPLL_cr_hip_mono2_10bit_jpeglossless_sv1.dcm", 64)
    # 2140 x 1760 (portrait): 53 columns of image centred in 64, zero columns either side
    assert (img[:, :5] == 0).all() and (img[:, -5:] == 0).all()
    assert img[:, 8:56].std() > 0.05


# -- pydicom's bundled files -------------------------------------------------------------------------
def test_pydicom_lossless_variants_agree():
    ref = decode_dicom(_testdata("MR_small.dcm"), 32)
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_allclose(decode_dicom(_testdata(name), 32), ref, atol=1e-6)
    assert ref.std() > 0.05


def test_pydicom_signed_ct_and_12bit_jpeg_extended():
    ct = decode_dicom(_testdata("CT_small.dcm"), 32)  # signed, RescaleIntercept, window tags
    assert np.isfinite(ct).all() and 0 <= ct.min() and ct.max() <= 1 and ct.std() > 0.05
    ext = decode_dicom(_testdata("JPGExtended.dcm"), 32)  # 12-bit JPEG extended (4.51)
    assert ext.std() > 0.05
    assert read_header(_testdata("JPGExtended.dcm")).transfer_syntax == "1.2.840.10008.1.2.4.51"


def test_pydicom_multiframe_is_one_image_per_frame_and_colour_is_luminance():
    with pytest.raises(SkipImage) as exc:  # decode_dicom is the one-image API
        decode_dicom(_testdata("rtdose.dcm"), 32)
    assert exc.value.reason == "multi-frame"
    frames, h = decode_item(_testdata("rtdose.dcm"), 32)
    assert isinstance(frames, Frames) and frames.total == h.frames > 1
    assert frames.images.shape[1:] == (32, 32) and frames.images.dtype == np.uint16
    assert len(frames.index) + len(frames.skipped) == frames.total
    rgb = decode_dicom(_testdata("SC_rgb_rle.dcm"), 32)  # colour -> luminance, not skipped
    assert rgb.std() > 0.05


# -- corrupt inputs -------------------------------------------------------------------------------
def test_corrupt_inputs_raise_skipimage_with_reason(tmp_path):
    expected = make_corrupt_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(SkipImage) as exc:
            decode_dicom(tmp_path / name, 32)
        assert exc.value.reason == reason, (name, exc.value.reason, exc.value.detail)
        assert exc.value.reason in REASONS and exc.value.detail
        # the no-decode structural check agrees on everything it can see
        if reason != "decode-failed":
            with pytest.raises(SkipImage) as exc2:
                check_dicom(tmp_path / name)
            assert exc2.value.reason == reason
    with pytest.raises(SkipImage) as exc:
        read_header(tmp_path / "notes.dcm")
    assert exc.value.reason == "not-dicom"
    with pytest.raises(SkipImage) as exc:
        decode_dicom(tmp_path / "does-not-exist.dcm", 32)
    assert exc.value.reason == "unreadable"


def test_garbage_and_cut_header(tmp_path):
    src = small_dicom(tmp_path / "ok.dcm")
    (tmp_path / "cut.dcm").write_bytes(src.read_bytes()[:200])  # preamble + part of the meta header
    (tmp_path / "rand.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for name in ("cut.dcm", "rand.bin"):
        with pytest.raises(SkipImage) as exc:
            decode_dicom(tmp_path / name, 32)
        assert exc.value.reason in ("truncated", "not-dicom")


def test_bits_stored_masks_high_bits(tmp_path):
    import pydicom

    clean = small_dicom(tmp_path / "clean.dcm", rows=16, cols=16)
    ds = pydicom.dcmread(clean)
    arr = ds.pixel_array | np.uint16(0xF000)  # garbage above BitsStored=12 (e.g. old overlay bits)
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "dirty.dcm")
    np.testing.assert_allclose(decode_dicom(tmp_path / "dirty.dcm", 16), decode_dicom(clean, 16), atol=1e-6)


def test_monochrome1_and_window_tags(tmp_path):
    import pydicom

    m2 = decode_dicom(small_dicom(tmp_path / "m2.dcm", rows=16, cols=16), 16)
    m1 = decode_dicom(small_dicom(tmp_path / "m1.dcm", rows=16, cols=16, photometric="MONOCHROME1"), 16)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-5)
    ds = pydicom.dcmread(tmp_path / "m2.dcm")
    ds.WindowCenter, ds.WindowWidth = 1024, 2048  # only the lower half of 0..4095 is displayed
    ds.save_as(tmp_path / "win.dcm")
    win = decode_dicom(tmp_path / "win.dcm", 16)
    assert (win[-4:] == 1.0).all()  # the upper rows are clipped white by the window
    assert win[0, 0] < 0.01 and 0.4 < win[4, 0] < 0.6


def test_constant_and_zero_slope_images_are_blank(tmp_path):
    import pydicom

    with pytest.raises(SkipImage) as exc:
        decode_dicom(small_dicom(tmp_path / "flat.dcm", value=700), 16)
    assert exc.value.reason == "blank"
    for slope in ("0", "inf", "nan"):
        ds = pydicom.dcmread(small_dicom(tmp_path / "g.dcm"))
        ds.RescaleSlope, ds.RescaleIntercept = slope, "0"
        ds.save_as(tmp_path / f"slope-{slope}.dcm")
        with pytest.raises(SkipImage) as exc:
            decode_dicom(tmp_path / f"slope-{slope}.dcm", 16)
        assert exc.value.reason == "blank", slope


# -- image_ops / header_signals --------------------------------------------------------------------
def test_fit_square_keeps_aspect_and_is_fast():
    img = np.ones((100, 50), np.float32)
    out = fit_square(img, 20)
    assert out.shape == (20, 20)
    assert (out[:, :5] == 0).all() and (out[:, 15:] == 0).all() and np.allclose(out[:, 5:15], 1)
    big = np.random.default_rng(0).random((2000, 1600), dtype=np.float32)
    t = time.perf_counter()
    small = fit_square(big, 64)
    assert time.perf_counter() - t < 0.5
    assert abs(float(small[:, 8:54].mean()) - 0.5) < 0.02  # antialiased: averages, not aliased samples
    assert float(small[:, 8:54].std()) < 0.05


def test_age_and_buckets():
    assert parse_age("045Y") == 45 and parse_age("006M") == 0.5 and parse_age("") is None
    assert parse_age("abc") is None and abs(parse_age("010W") - 70 / 365.25) < 1e-9
    assert [age_bucket(a) for a in (None, 3, 18, 45, 60, 95)] == ["unknown", "0-17", "18-39", "40-59",
                                                                  "60-79", "80+"]


def test_patient_key_and_salt(tmp_path):
    salt_path = tmp_path / "site" / "salt.bin"
    salt = load_or_create_salt(salt_path)
    assert len(salt) == 32 and load_or_create_salt(salt_path) == salt
    assert stat.S_IMODE(os.stat(salt_path).st_mode) == 0o600
    assert not [p for p in salt_path.parent.iterdir() if p.name != "salt.bin"]  # no temp left behind
    k = patient_key("PAT-1", "1.2.3", salt)
    assert len(k) == 16 and k == patient_key("PAT-1", "9.9.9", salt)  # PatientID wins over study
    assert k != patient_key("PAT-1", "1.2.3", b"x" * 32)  # salt-dependent: not linkable across sites
    assert "PAT" not in k
    assert patient_key("", "1.2.3", salt) == patient_key(None, "1.2.3", salt) != k


def test_histogram_percentiles_equal_numpy_on_integer_pixels():
    """image_ops.percentiles (a histogram for 8/16-bit pixels) gives np.percentile's linear values exactly."""
    from fedrad.common.image_ops import percentiles

    rng = np.random.default_rng(7)
    for trial in range(400):
        dtype = (np.uint8, np.uint16, np.int16, np.int8)[trial % 4]
        info = np.iinfo(dtype)
        lo = int(rng.integers(info.min, info.max))
        values = rng.integers(lo, int(rng.integers(lo, info.max + 1)) + 1, size=(int(rng.integers(1, 60)), 37))
        values = values.astype(dtype)
        qs = [float(rng.uniform(0, 100)), 0.5, 99.5, 0.0, 100.0]
        assert percentiles(values, qs) == [float(x) for x in np.percentile(values, qs)], (dtype, values.shape)
    floats = rng.normal(size=(50, 50)).astype(np.float32)
    assert percentiles(floats, (1.0, 99.0)) == [float(x) for x in np.percentile(floats, [1.0, 99.0])]
