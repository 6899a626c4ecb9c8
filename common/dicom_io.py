"""Read DICOM headers and decode X-ray pixels into a normalised [0, 1] square image.

Every way a hospital file can be unusable ends in `SkipImage(reason, detail)` with a short stable reason
code, never another exception type: the scan report, the cache and the site loader count and list these,
and one bad file must never stop a site from training.

Decoding uses pydicom 3 with its plugins (pylibjpeg-libjpeg/openjpeg/rle, Pillow), which covers
uncompressed, RLE, JPEG baseline, 12-bit JPEG extended, JPEG lossless, JPEG-LS and JPEG 2000.

Before any decoder runs, the header's geometry and the codec's own declared size are checked against a
pixel budget (`too-large`, see sources/budget.py); constant images and RescaleSlope 0/inf are `blank`.

Multi-frame files are skipped (`multi-frame`), not reduced to frame 0: in projection radiography a
multi-frame object is a tomosynthesis stack, fluoroscopy cine or a CT/MR volume, where frame 0 is an
arbitrary slice rather than "the radiograph"; silently training on it would pollute the data, and decoding
a whole stack to keep one frame is slow. The scan lists them, so a site can export them differently.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from fedrad.common.header_signals import age_from_dates, parse_age
from fedrad.common.image_ops import fit_square, robust_minmax
from fedrad.common.sources.budget import (
    DEFAULT_MAX_PIXELS,
    check_codec_size,
    check_pixel_budget,
    first_fragment,
)
from fedrad.common.sources.errors import REASONS, SkipImage, reraise_fatal, skip_from

__all__ = ["REASONS", "SkipImage", "HeaderInfo", "read_header", "check_dicom", "decode_dicom",
           "decode_with_header", "DEFAULT_MAX_PIXELS"]


# Tags a real DICOM image object has; a non-DICOM file read with force=True has none of them.
_PLAUSIBLE = (0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x00280010, 0x00280011, 0x7FE00010)
_LATERAL = {"LL", "RL", "LAT", "LATERAL", "LAT."}


@dataclass
class HeaderInfo:
    """The header fields fedrad uses: weak labels, inventory columns and pseudonymisation inputs."""

    modality: str
    body_part: str
    view: str
    sex: str
    age_years: float | None
    photometric: str
    transfer_syntax: str
    transfer_syntax_name: str
    bits_stored: int
    rows: int
    cols: int
    frames: int
    patient_id: str
    study_uid: str
    sop_uid: str

    def as_dict(self) -> dict:
        return asdict(self)


def _import_pydicom():
    import pydicom  # local: keeps `import fedrad.common.dicom_io` cheap for the CLI

    return pydicom


@contextlib.contextmanager
def _quiet_pydicom_log(level: int = logging.ERROR) -> Iterator[None]:
    """pydicom also *logs* what it warns (e.g. on garbage read with force=True); we report via SkipImage."""
    log = logging.getLogger("pydicom")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _read(src: str | os.PathLike[str] | bytes, pixels: bool, max_pixels: int = DEFAULT_MAX_PIXELS):
    """dcmread with force=True, but only after checks that keep text/garbage files out (`not-dicom`).

    `src` is a path or the file's bytes. A file too big to hold the budget's pixels is judged on its header
    alone, so an 8 GB uncompressed bomb is never read into memory.
    """
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError

    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        size, head, fp = len(data), data[:132], io.BytesIO(data)
    else:
        try:
            size = os.path.getsize(src)
            with open(src, "rb") as f:
                head = f.read(132)
        except OSError as exc:
            raise skip_from(exc) if isinstance(exc, PermissionError) else SkipImage("unreadable", str(exc)) \
                from None
        fp = src
    if size == 0:
        raise SkipImage("empty-file", "0 bytes")
    has_magic = len(head) == 132 and head[128:132] == b"DICM"
    header_only = not pixels or size > max_pixels * 4 + (64 << 20)
    try:
        with warnings.catch_warnings(record=True) as caught, _quiet_pydicom_log():
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
            truncated = "" if header_only and pixels else _truncation(ds, size, caught)
            # Parse every element now (pydicom is lazy): corrupt values surface here, not later.
            for _ in ds.iterall():
                pass
    except (EOFError, InvalidDicomError, ValueError, KeyError, TypeError, OverflowError, OSError,
            IndexError, AttributeError, NotImplementedError, RuntimeError, UnicodeError, MemoryError,
            struct.error) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, MemoryError):
            raise SkipImage("out-of-memory", "out of memory reading the header") from None
        if not has_magic:
            raise SkipImage("not-dicom", f"no DICM preamble and unparseable ({msg[:120]})") from None
        if isinstance(exc, EOFError) or "end of file" in msg.lower() or "truncat" in msg.lower():
            raise SkipImage("truncated", msg[:200]) from None
        raise SkipImage("not-dicom", f"unparseable DICOM ({msg[:160]})") from None
    except BaseException as exc:  # noqa: BLE001 - pydicom raises its own types too (BytesLengthException, ...)
        reraise_fatal(exc)
        raise skip_from(exc, "reading") from None
    if truncated and (has_magic or len(ds) > 3):
        raise SkipImage("truncated", truncated)
    if not has_magic:
        tags = {int(t) for t in ds.keys()}
        if not tags.intersection(_PLAUSIBLE) or "SOPClassUID" not in ds and "Rows" not in ds:
            raise SkipImage("not-dicom", "no DICM preamble and no DICOM image attributes")
    if header_only and pixels:  # the file alone is bigger than any image within budget
        _budget(ds, max_pixels)
        raise SkipImage("too-large", f"{size / 2**20:.0f} MiB file, over the pixel budget's size")
    return ds


def _truncation(ds, size: int, caught: list) -> str:
    """Why the file looks cut short ('' if it does not): pydicom reads a short file without raising."""
    for w in caught:
        msg = str(w.message)
        if "end of file" in msg.lower() or "truncat" in msg.lower():
            return " ".join(msg.split())[:200]
    keys = list(ds.keys())
    if not keys:
        return "no data elements after the file meta header"
    last = ds.get_item(max(keys))
    length, tell = getattr(last, "length", None), getattr(last, "value_tell", None)
    if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > size:
        return f"element {last.tag} declares {length} bytes, file ends after {max(0, size - tell)}"
    return ""


def _str(ds, keyword: str) -> str:
    v = ds.get(keyword, "")
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        v = v[0] if len(v) else ""
    return str(v).strip()


def _int(ds, keyword: str, default: int = 0) -> int:
    try:
        v = ds.get(keyword, None)
        return int(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _header(ds) -> HeaderInfo:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2"  # no meta: pydicom parsed it as implicit VR little endian
    ts_name = UID(ts).name if ts else ""
    view = _str(ds, "ViewPosition").upper()
    age = parse_age(_str(ds, "PatientAge"))
    if age is None:
        age = age_from_dates(_str(ds, "PatientBirthDate"),
                             _str(ds, "StudyDate") or _str(ds, "AcquisitionDate") or _str(ds, "ContentDate"))
    return HeaderInfo(
        modality=_str(ds, "Modality").upper(),
        body_part=_str(ds, "BodyPartExamined").upper(),
        view="LATERAL" if view in _LATERAL else view,
        sex=_str(ds, "PatientSex").upper()[:1],
        age_years=None if age is None else round(float(age), 2),
        photometric=_str(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=ts,
        transfer_syntax_name=ts_name,
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 0)),
        rows=_int(ds, "Rows"),
        cols=_int(ds, "Columns"),
        frames=max(1, _int(ds, "NumberOfFrames", 1)),
        patient_id=_str(ds, "PatientID"),
        study_uid=_str(ds, "StudyInstanceUID"),
        sop_uid=_str(ds, "SOPInstanceUID"),
    )


def read_header(path: str | os.PathLike[str] | bytes) -> HeaderInfo:
    """Header only (pixels not read or decoded): fast inventory. Raises SkipImage.

    View positions LL/RL/LAT/LATERAL are normalised to 'LATERAL' so the weak label agrees across sites.
    """
    ds = _read(path, pixels=False)
    try:
        return _header(ds)
    except BaseException as exc:  # noqa: BLE001
        reraise_fatal(exc)
        raise SkipImage("not-dicom", f"unreadable header values ({' '.join(str(exc).split())[:160]})") from None


def _syntax_kind(ts: str) -> str:
    """Which codec header check applies to a transfer syntax: 'rle', 'jpeg' (incl. JPEG-LS), 'jpeg2000'."""
    if ts == "1.2.840.10008.1.2.5":
        return "rle"
    if ts.startswith("1.2.840.10008.1.2.4."):
        n = ts.rsplit(".", 1)[-1]
        if n in ("50", "51", "57", "70", "80", "81"):  # JPEG baseline/extended/lossless, JPEG-LS
            return "jpeg"
        if n in ("90", "91", "92", "93", "201", "202", "203"):  # JPEG 2000, HTJ2K
            return "jpeg2000"
    return ""


def _budget(ds, max_pixels: int) -> None:
    """The pixel budget from header numbers only (no pixel data needed)."""
    check_pixel_budget(_int(ds, "Rows"), _int(ds, "Columns"), max(1, _int(ds, "NumberOfFrames", 1)),
                       _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 16), max_pixels)


def _check_blank_tags(ds) -> None:
    slope = ds.get("RescaleSlope", None)
    if slope in (None, ""):
        return
    try:
        value = float(slope)
    except (TypeError, ValueError):
        raise SkipImage("blank", f"RescaleSlope {str(slope)[:40]!r} is not a number") from None
    if value == 0 or not math.isfinite(value):
        raise SkipImage("blank", f"RescaleSlope {value}: every pixel maps to one value")


def _check_image(ds, h: HeaderInfo, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Reject what decode cannot turn into one grayscale radiograph, before spending time decoding."""
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise SkipImage("no-pixel-data", "only float pixel data" if other else "no (7FE0,0010) Pixel Data")
    _budget(ds, max_pixels)
    if h.frames > 1:
        raise SkipImage("multi-frame", f"{h.frames} frames (only single-frame radiographs are used)")
    spp = _int(ds, "SamplesPerPixel", 1)
    if spp > 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SkipImage("colour", f"SamplesPerPixel={spp}, {h.photometric or 'no photometric'}")
    if h.rows <= 0 or h.cols <= 0:
        raise SkipImage("bad-dimensions", f"Rows={h.rows} Columns={h.cols}")
    _check_blank_tags(ds)
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(h.transfer_syntax)
    except (NotImplementedError, ValueError) as exc:
        raise SkipImage("unsupported-syntax", f"{h.transfer_syntax_name or h.transfer_syntax}: {exc}") from None
    if not decoder.is_available:
        raise SkipImage("unsupported-syntax",
                        f"{h.transfer_syntax_name}: no decoder plugin installed (pylibjpeg-*/pillow)")
    bits_alloc = _int(ds, "BitsAllocated", 0)
    if bits_alloc not in (1, 8, 16, 32) or not 0 < h.bits_stored <= bits_alloc:
        raise SkipImage("bad-dimensions", f"BitsAllocated={bits_alloc} BitsStored={h.bits_stored}")
    pixel_data = ds.PixelData
    if not pixel_data:  # present but empty (or a value pydicom parsed as None)
        raise SkipImage("no-pixel-data", "Pixel Data element is empty")
    if not decoder.is_encapsulated:
        expected = math.ceil(h.rows * h.cols * bits_alloc / 8)
        have = len(pixel_data)
        if have < expected:
            raise SkipImage("bad-dimensions",
                            f"Pixel Data has {have} bytes, {h.rows}x{h.cols}x{bits_alloc} bit needs {expected}")
    else:
        kind = _syntax_kind(h.transfer_syntax)
        if kind:
            check_codec_size(kind, first_fragment(pixel_data), h.rows, h.cols, spp, bits_alloc, max_pixels)


def _voi_range(ds) -> tuple[float, float]:
    """Output range of pydicom's windowing (mirrors apply_windowing), to map the window to [0, 1]."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif _int(ds, "PixelRepresentation", 0) == 0:
        lo, hi = 0.0, float(2 ** _int(ds, "BitsStored", 8) - 1)
    else:
        bs = _int(ds, "BitsStored", 8)
        lo, hi = float(-(2 ** (bs - 1))), float(2 ** (bs - 1) - 1)
    slope, icpt = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and icpt is not None:
        lo, hi = lo * float(slope) + float(icpt), hi * float(slope) + float(icpt)
    return min(lo, hi), max(lo, hi)


def _degenerate(x: np.ndarray) -> bool:
    """A window that clips (almost) everything to one value: wrong tags, so fall back to min-max."""
    step = max(1, int(np.sqrt(x.size / 100_000)))
    s = x[::step, ::step]
    return float(s.std()) < 1e-3 or max(float((s <= 0.0).mean()), float((s >= 1.0).mean())) > 0.95


def _to_unit(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> [0, 1] display intensities: BitsStored mask, Modality LUT, VOI LUT/window, MONO1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits_stored = _int(ds, "BitsStored", 0)
    if arr.dtype.kind == "u" and 0 < bits_stored < arr.dtype.itemsize * 8:
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)  # drop overlay/garbage high bits
    values = apply_modality_lut(arr, ds)
    out: np.ndarray | None = None
    if ds.get("VOILUTSequence"):
        try:
            v = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
            lo, hi = float(v.min()), float(v.max())
            out = (v - lo) / (hi - lo) if hi > lo else None
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            out = None
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            v = apply_voi_lut(values, ds, index=0, prefer_lut=False)
            lo, hi = _voi_range(ds)
            out = ((v - lo) / (hi - lo)).astype(np.float32) if hi > lo else None
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            out = None
    if out is not None:
        out = np.clip(out, 0.0, 1.0)
        if _degenerate(out):
            out = None
    if out is None:
        out = robust_minmax(np.asarray(values, dtype=np.float32))
    if _str(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _parse(src, max_pixels: int):
    ds = _read(src, pixels=True, max_pixels=max_pixels)
    try:
        h = _header(ds)
    except BaseException as exc:  # noqa: BLE001 - any oddity in header values means the file is unusable
        reraise_fatal(exc)
        raise SkipImage("not-dicom", f"unreadable header values ({' '.join(str(exc).split())[:160]})") from None
    _check_image(ds, h, max_pixels)
    return ds, h


def decode_with_header(path: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                       ) -> tuple[np.ndarray, HeaderInfo]:
    """decode_dicom plus the header it read on the way (one file read for both: the cache stores both)."""
    ds, h = _parse(path, max_pixels)
    try:
        with warnings.catch_warnings(), _quiet_pydicom_log(logging.CRITICAL):
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except BaseException as exc:  # noqa: BLE001 - decoder plugins raise anything; the contract is SkipImage
        reraise_fatal(exc)
        raise skip_from(exc, h.transfer_syntax_name) from None
    if arr.ndim != 2 or arr.shape != (h.rows, h.cols):
        raise SkipImage("bad-dimensions", f"decoded shape {arr.shape}, header says {h.rows}x{h.cols}")
    if arr.size and arr.min() == arr.max():
        raise SkipImage("blank", f"every pixel is {arr.flat[0]}")
    try:
        unit = _to_unit(arr, ds)
    except BaseException as exc:  # noqa: BLE001
        reraise_fatal(exc)
        raise skip_from(exc, "intensity mapping") from None
    if not np.isfinite(unit).all():
        raise SkipImage("decode-failed", "non-finite pixel values")
    if float(unit.max()) - float(unit.min()) < 1e-6:
        raise SkipImage("blank", "constant image after the intensity mapping")
    return fit_square(unit, size), h


def decode_dicom(path: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 ) -> np.ndarray:
    """float32 [size, size] in [0, 1]: Modality LUT, VOI LUT/window (else robust min-max), MONOCHROME1
    inverted, aspect kept and zero-padded to a square. Raises SkipImage for anything unusable."""
    return decode_with_header(path, size, max_pixels)[0]


def check_dicom(path: str | os.PathLike[str] | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> HeaderInfo:
    """Header plus every structural check decode_dicom makes, without decoding pixels (`scan --no-decode`).

    Catches missing pixels, over-budget sizes, multi-frame, colour, short Pixel Data and missing codecs;
    only a corrupt compressed bitstream needs a real decode to be found.
    """
    return _parse(path, max_pixels)[1]
