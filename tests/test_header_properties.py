"""Property tests (hypothesis) for the header parsers that see untrusted bytes and strings: codec size
markers, the pixel budget, display names, DICOM age strings and dates."""

from __future__ import annotations

import unicodedata

from hostile_dicom import j2k_stream, jpeg_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrad.common.header_signals import age_bucket, age_from_dates, parse_age
from fedrad.common.sources.budget import (
    check_pixel_budget,
    first_fragment,
    j2k_size,
    jpeg_size,
    rle_segments,
)
from fedrad.common.sources.errors import REASONS, SkipImage, skip_from
from fedrad.common.sources.walk import display_name

FAST = settings(max_examples=300, deadline=None)


@FAST
@given(st.binary(max_size=4096))
def test_codec_parsers_never_raise(data):
    for fn in (jpeg_size, j2k_size, rle_segments, first_fragment):
        fn(data)
    jpeg_size(b"\xff\xd8" + data)
    j2k_size(b"\xff\x4f\xff\x51" + data)


@FAST
@given(st.integers(1, 65535), st.integers(0, 65535), st.sampled_from([0xC0, 0xC1, 0xC3, 0xF7]))
def test_jpeg_sof_round_trip(width, height, sof):
    size = jpeg_size(jpeg_stream(width, height, sof))
    assert (size.width, size.height, size.components) == (width, height, 1)


@FAST
@given(st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1))
def test_j2k_siz_round_trip(width, height):
    size = j2k_size(j2k_stream(width, height))
    assert (size.width, size.height) == (width, height)


@FAST
@given(st.integers(0, 70000), st.integers(0, 70000), st.integers(1, 5000), st.integers(1, 4))
def test_budget_is_exactly_the_pixel_count(rows, cols, frames, samples):
    budget = 64 << 20
    over = rows * cols * frames * samples > budget
    try:
        check_pixel_budget(rows, cols, frames, samples, 16, budget)
        assert not over
    except SkipImage as exc:
        assert over and exc.reason == "too-large"


@FAST
@given(st.text(max_size=60))
def test_display_name_is_printable(name):
    shown = display_name(name)
    shown.encode("utf-8")  # always storable in the UTF-8 JSON inventory
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in shown)
    if all(unicodedata.category(c)[0] in "LNPSZ" and unicodedata.category(c) not in ("Zl", "Zp") for c in name):
        assert shown == name  # ordinary names are shown unchanged


@FAST
@given(st.binary(max_size=40))
def test_display_name_of_any_bytes_name(raw):
    import os

    shown = display_name(os.fsdecode(raw))
    shown.encode("utf-8")
    assert "\n" not in shown and "\x1b" not in shown


@FAST
@given(st.text(max_size=12))
def test_parse_age_never_raises_and_is_bounded(text):
    age = parse_age(text)
    assert age is None or 0 <= age < 130
    assert age_bucket(age) in ("0-17", "18-39", "40-59", "60-79", "80+", "unknown")


@FAST
@given(st.integers(0, 129))
def test_parse_age_round_trip(years):
    assert parse_age(f"{years:03d}Y") == years


@FAST
@given(st.text(max_size=10), st.text(max_size=10))
def test_age_from_dates_never_raises(birth, when):
    age = age_from_dates(birth, when)
    assert age is None or 0 <= age < 130


@FAST
@given(st.sampled_from([ValueError, TypeError, KeyError, IndexError, OSError, EOFError, MemoryError, RuntimeError,
                        ZeroDivisionError, AssertionError, UnicodeError, OverflowError]), st.text(max_size=50))
def test_any_exception_maps_to_a_listed_reason(kind, message):
    assert skip_from(kind(message)).reason in REASONS
