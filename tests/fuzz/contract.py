"""The property every fuzz input must satisfy, shared by the atheris harnesses and the regression tests:
a usable [0, 1] float32 image of the requested size, or SkipImage with a listed reason. Anything else
(another exception type, a non-finite pixel) is a bug."""

from __future__ import annotations

import numpy as np

from fedrad.common.dicom_io import decode_with_header, read_header
from fedrad.common.sources.errors import REASONS, SkipImage
from fedrad.common.sources.image_folder import image_entry

MAX_PIXELS = 1 << 22  # 4 Mpixel: keeps each input fast; the budget logic itself is what is fuzzed
SIZE = 16


def _image_ok(img: np.ndarray) -> None:
    assert img.shape == (SIZE, SIZE) and img.dtype == np.float32, (img.shape, img.dtype)
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


def check_dicom_bytes(data: bytes) -> str:
    """Header read, then full decode; returns 'ok' or the skip reason. Raises on a contract violation."""
    try:
        read_header(data)
    except SkipImage as exc:
        assert exc.reason in REASONS, exc.reason
    try:
        img, _h = decode_with_header(data, SIZE, MAX_PIXELS)
    except SkipImage as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason
    _image_ok(img)
    return "ok"


def check_image_bytes(data: bytes) -> str:
    try:
        img, _ = image_entry(data, SIZE, b"", MAX_PIXELS)
    except SkipImage as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason
    _image_ok(img)
    return "ok"


def fuzz(target) -> None:
    """Run `target` under atheris with the harnesses' shared settings: a Rust decoder panic (caught) would
    otherwise spend seconds symbolising its backtrace, and warnings/log lines would drown libFuzzer's output."""
    import logging
    import os
    import sys
    import warnings

    import atheris

    os.environ["RUST_BACKTRACE"] = "0"
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
