"""Read DICOM headers and decode pixels (radiographs, CT, MR, US, NM, PET) into normalised [0, 1] squares.

Over 500 lines on purpose: one concern (a DICOM file to pixels or one SkipImage reason), and every
modality's rules meet in the one decode path the pixel budget guards.

Every way a hospital file can be unusable ends in `SkipImage(reason, detail)` with a short stable reason
code, never another exception type: the scan report, the cache and the site loader count and list these,
and one bad file must never stop a site from training.

Decoding uses pydicom 3 with its plugins (pylibjpeg-libjpeg/openjpeg/rle, Pillow), which covers
uncompressed, RLE, JPEG baseline, 12-bit JPEG extended, JPEG lossless, JPEG-LS and JPEG 2000.

Before any decoder runs, the header's geometry and the codec's own declared size are checked against a
pixel budget (`too-large`, see sources/budget.py); constant images and RescaleSlope 0/inf are `blank`.

Multi-frame objects (enhanced CT/MR/PET, ultrasound cine) are decoded frame by frame by `decode_frames`
(pydicom's `iter_pixels`, from the file itself when it is large, so memory is bounded by one frame), each
frame with its per-frame functional groups applied (rescale, window, position, orientation); a frame that
fails or is blank costs that frame only. `decode_dicom` (one image) still refuses them as `multi-frame`.
Colour (RGB, YBR_*, PALETTE COLOR) becomes luminance with pydicom's own converters (`apply_color_lut`,
`convert_color_space` to YBR_FULL, whose Y is the luminance). A file without a File Meta header is read when
its pixel data is native (the encoding pydicom detected is the transfer syntax); Deflated Explicit VR Little
Endian is read (pydicom inflates it).
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
from fedrad.common.image_ops import fit_square, percentiles, robust_minmax, to_uint16
from fedrad.common.sources.base import Frames
from fedrad.common.sources.budget import (
    DEFAULT_MAX_PIXELS,
    check_codec_size,
    check_pixel_budget,
    first_fragment,
)
from fedrad.common.sources.errors import REASONS, SkipImage, reraise_fatal, skip_from

__all__ = ["REASONS", "SkipImage", "HeaderInfo", "read_header", "check_dicom", "decode_dicom",
           "decode_with_header", "decode_item", "Frames", "DEFAULT_MAX_PIXELS"]


# Tags a real DICOM image object has; a non-DICOM file read with force=True has none of them.
_PLAUSIBLE = (0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x00280010, 0x00280011, 0x7FE00010)
_LATERAL = {"LL", "RL", "LAT", "LATERAL", "LAT."}
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Colour models turned into luminance (after pydicom's decode, YBR_FULL/422 is RGB; YBR_ICT/RCT come out of the
# JPEG 2000 decoder as RGB); anything else (YBR_PARTIAL_*, ARGB, CMYK) is skipped as `colour`.
COLOUR_MODELS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
MAX_FRAMES = 10_000  # frames of one object: more is a bomb or a volume better exported as a series
LAZY_BYTES = 64 << 20  # multi-frame files larger than this are decoded straight from the file, frame by frame


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
    # cross-sectional geometry and header labels (empty / None when the header has none)
    series_uid: str = ""
    instance_number: int | None = None
    position: list[float] | None = None  # ImagePositionPatient (mm)
    orientation: list[float] | None = None  # ImageOrientationPatient (row and column direction cosines)
    burned_in: str = ""  # BurnedInAnnotation: YES / NO / ''
    contrast: str = ""  # ContrastBolusAgent
    series_description: str = ""
    intensity: str = ""  # how pixels became [0, 1]: hu (CT), percentile (MR; value_range = its lo/hi), display
    value_range: list[float] | None = None

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


def _read(src: str | os.PathLike[str] | bytes, pixels: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
          lazy_ok: bool = True):
    """dcmread with force=True, but only after checks that keep text/garbage files out (`not-dicom`).

    `src` is a path or the file's bytes. A file too big to hold the budget's pixels is judged on its header
    alone, so an 8 GB uncompressed bomb is never read into memory. A multi-frame file over LAZY_BYTES comes
    back without its pixels (`ds.fedrad_lazy` = its path): decode_frames reads its frames one at a time.
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
    big = size > max_pixels * 4 + (64 << 20)
    lazy = pixels and lazy_ok and not isinstance(src, (bytes, bytearray, memoryview)) and size > LAZY_BYTES
    header_only = not pixels or big or lazy
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
    _establish_syntax(ds)
    if header_only and pixels:
        _budget(ds, max_pixels)
        if max(1, _int(ds, "NumberOfFrames", 1)) > 1:
            ds.fedrad_lazy = os.fspath(fp)  # decode_frames reads the frames from the file, one at a time
            return ds
        if not big:  # a large single-frame file within the budget: read it whole after all
            return _read(src, pixels, max_pixels, lazy_ok=False)
        raise SkipImage("too-large", f"{size / 2**20:.0f} MiB file, over the pixel budget's size")
    return ds


def _establish_syntax(ds) -> None:
    """A dataset without File Meta: its transfer syntax is the encoding pydicom detected, if pixels are native.

    Encapsulated pixel data without a File Meta cannot say which codec made it: `unsupported-syntax`."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    elem = ds.get("PixelData") if "PixelData" in ds else None
    if elem is not None and ds["PixelData"].is_undefined_length:
        raise SkipImage("unsupported-syntax", "no File Meta header and encapsulated (compressed) pixel data: "
                                              "the transfer syntax cannot be established")
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts


def _truncation(ds, size: int, caught: list) -> str:
    """Why the file looks cut short ('' if it does not): pydicom reads a short file without raising."""
    for w in caught:
        msg = str(w.message)
        if "end of file" in msg.lower() or "truncat" in msg.lower():
            return " ".join(msg.split())[:200]
    keys = list(ds.keys())
    if not keys:
        return "no data elements after the file meta header"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return ""  # element offsets count inflated bytes: comparing them with the file size means nothing
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


def _floats(ds, keyword: str, n: int) -> list[float] | None:
    try:
        v = ds.get(keyword, None)
        out = [float(x) for x in v] if v is not None else []
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(x) for x in out) else None


_VIEW_TAGS = ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation", "RescaleSlope",
              "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
              "ModalityLUTSequence", "VOILUTSequence", "ImagePositionPatient", "ImageOrientationPatient")
_FG_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence", "PlanePositionSequence",
              "PlaneOrientationSequence")


def _frame_view(ds, k: int):
    """The attributes frame `k` is displayed with: top level, then shared, then its per-frame functional
    groups (enhanced CT/MR/PET keep rescale, window, position and orientation there). `ds` itself when it has
    no functional groups."""
    shared, per = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per:
        return ds
    from pydicom.dataset import Dataset

    view = Dataset()
    for kw in _VIEW_TAGS:
        if kw in ds:
            view[kw] = ds[kw]
    groups = [shared[0] if shared else None, per[k] if per and k < len(per) else None]
    for g in groups:
        for macro in _FG_MACROS if g is not None else ():
            items = g.get(macro)
            if items:
                for elem in items[0]:
                    view[elem.tag] = elem
    return view


def _header(ds) -> HeaderInfo:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2"  # no meta: pydicom parsed it as implicit VR little endian
    ts_name = UID(ts).name if ts else ""
    fview = _frame_view(ds, 0)
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
        series_uid=_str(ds, "SeriesInstanceUID"),
        instance_number=_int(ds, "InstanceNumber", 0) if _str(ds, "InstanceNumber") else None,
        position=_floats(fview, "ImagePositionPatient", 3),
        orientation=_floats(fview, "ImageOrientationPatient", 6),
        burned_in=_str(ds, "BurnedInAnnotation").upper(),
        contrast=_str(ds, "ContrastBolusAgent"),
        series_description=_str(ds, "SeriesDescription"),
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
    """The pixel budget from header numbers only (no pixel data needed), per frame: multi-frame objects are
    decoded one frame at a time, so a frame is what must fit; the frame count is capped by MAX_FRAMES."""
    frames = max(1, _int(ds, "NumberOfFrames", 1))
    if frames > MAX_FRAMES:
        raise SkipImage("too-large", f"{frames} frames, more than {MAX_FRAMES} in one object")
    check_pixel_budget(_int(ds, "Rows"), _int(ds, "Columns"), 1, _int(ds, "SamplesPerPixel", 1),
                       _int(ds, "BitsAllocated", 16), max_pixels)


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


def _check_image(ds, h: HeaderInfo, max_pixels: int = DEFAULT_MAX_PIXELS, frames_ok: bool = True) -> None:
    """Reject what decode cannot turn into grayscale images, before spending time decoding."""
    lazy = getattr(ds, "fedrad_lazy", None)
    if "PixelData" not in ds and not lazy:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise SkipImage("no-pixel-data", "only float pixel data" if other else "no (7FE0,0010) Pixel Data")
    _budget(ds, max_pixels)
    if h.frames > 1 and not frames_ok:
        raise SkipImage("multi-frame", f"{h.frames} frames (decode_dicom reads one image; decode_item reads all)")
    spp = _int(ds, "SamplesPerPixel", 1)
    mono = spp == 1 and h.photometric in ("MONOCHROME1", "MONOCHROME2")
    palette = spp == 1 and h.photometric == "PALETTE COLOR"
    if not (mono or palette or spp == 3 and h.photometric in COLOUR_MODELS):
        raise SkipImage("colour", f"SamplesPerPixel={spp}, {h.photometric or 'no photometric'}")
    if palette and "RedPaletteColorLookupTableDescriptor" not in ds:
        raise SkipImage("colour", "PALETTE COLOR without its lookup table descriptors")
    if spp == 3 and _str(ds, "PlanarConfiguration") == "":
        raise SkipImage("colour", f"{h.photometric} without PlanarConfiguration (sample order unknown)")
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
    if lazy:
        return  # pixels stay in the file; each frame is checked as it is decoded
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


def _is_hu(ds) -> bool:
    """CT values are HU after the Modality LUT when a rescale is given or the samples are signed."""
    return "RescaleIntercept" in ds or _int(ds, "PixelRepresentation", 0) == 1


def _to_unit(arr: np.ndarray, ds, modality: str = "") -> tuple[np.ndarray, dict]:
    """Stored values -> [0, 1]: BitsStored mask, Modality LUT, then per modality (common/intensity.py):
    CT as linear HU, MR between its own percentiles (returned as value_range), others VOI LUT/window, MONO1.
    Returns (image, {"intensity": ..., "value_range": ...})."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from fedrad.common.intensity import MR_PERCENTILES, hu_to_unit

    bits_stored = _int(ds, "BitsStored", 0)
    if arr.dtype.kind == "u" and 0 < bits_stored < arr.dtype.itemsize * 8:
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)  # drop overlay/garbage high bits
    values = apply_modality_lut(arr, ds)
    if modality == "CT" and _is_hu(ds):
        return np.ascontiguousarray(hu_to_unit(values)), {"intensity": "hu"}
    if modality == "MR":
        step = max(1, int(np.sqrt(values.size / 250_000)))
        lo, hi = percentiles(values[::step, ::step], MR_PERCENTILES)
        v = np.asarray(values, dtype=np.float32)
        if hi > lo:
            out = np.clip((v - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
            return np.ascontiguousarray(out, dtype=np.float32), {"intensity": "percentile", "value_range": [lo, hi]}
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
        out = robust_minmax(values if values.dtype.kind in "ui" else np.asarray(values, dtype=np.float32))
    if _str(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32), {"intensity": "display"}


def _parse(src, max_pixels: int, frames_ok: bool = True):
    ds = _read(src, pixels=True, max_pixels=max_pixels)
    try:
        h = _header(ds)
    except BaseException as exc:  # noqa: BLE001 - any oddity in header values means the file is unusable
        reraise_fatal(exc)
        raise SkipImage("not-dicom", f"unreadable header values ({' '.join(str(exc).split())[:160]})") from None
    _check_image(ds, h, max_pixels, frames_ok)
    return ds, h


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """RGB (any unsigned depth) -> luminance in [0, 1]: the Y of pydicom's RGB -> YBR_FULL conversion."""
    from pydicom.pixels import convert_color_space

    if rgb.dtype != np.uint8:
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        rgb = np.clip(np.round(rgb.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    y = convert_color_space(np.ascontiguousarray(rgb), "RGB", "YBR_FULL")[..., 0]
    return y.astype(np.float32) / 255.0


def _unit(arr: np.ndarray, ds, view, rows: int, cols: int) -> tuple[np.ndarray, dict]:
    """One decoded frame -> (float32 [rows, cols] in [0, 1], how: intensity / value_range); SkipImage if
    unusable."""
    photometric = _str(ds, "PhotometricInterpretation").upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
        raise SkipImage("bad-dimensions", f"decoded shape {arr.shape}, header says {rows}x{cols}")
    if arr.size and arr.min() == arr.max():
        raise SkipImage("blank", f"every pixel is {arr.flat[0]}")
    try:
        unit, how = (_luminance(arr), {"intensity": "luminance"}) if arr.ndim == 3 else \
            _to_unit(arr, view, _str(ds, "Modality").upper())
    except BaseException as exc:  # noqa: BLE001
        reraise_fatal(exc)
        raise skip_from(exc, "intensity mapping") from None
    if not np.isfinite(unit).all():
        raise SkipImage("decode-failed", "non-finite pixel values")
    if float(unit.max()) - float(unit.min()) < 1e-6:
        raise SkipImage("blank", "constant image after the intensity mapping")
    return unit, how


def _single(ds, h: HeaderInfo, size: int) -> np.ndarray:
    try:
        with warnings.catch_warnings(), _quiet_pydicom_log(logging.CRITICAL):
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except BaseException as exc:  # noqa: BLE001 - decoder plugins raise anything; the contract is SkipImage
        reraise_fatal(exc)
        raise skip_from(exc, h.transfer_syntax_name) from None
    unit, how = _unit(arr, ds, _frame_view(ds, 0), h.rows, h.cols)
    h.intensity, h.value_range = how["intensity"], how.get("value_range")
    return fit_square(unit, size)


def frame_meta(view, k: int) -> dict:
    """Per-frame fields stored with each frame: its index, position and orientation."""
    return {"frame": k, "position": _floats(view, "ImagePositionPatient", 3),
            "orientation": _floats(view, "ImageOrientationPatient", 6)}


def _frames(ds, h: HeaderInfo, size: int) -> Frames:
    """Every frame of a multi-frame object, decoded one at a time (pydicom's iter_pixels), each mapped with its
    own functional groups. A frame that fails or is blank is listed in `skipped`; the rest still count."""
    from pydicom.pixels import iter_pixels

    n = h.frames
    source = getattr(ds, "fedrad_lazy", None) or ds
    images = np.zeros((n, size, size), dtype=np.uint16)
    out = Frames(images=images, index=[], metas=[], skipped=[], total=n)
    k, failures = 0, 0
    while k < n:
        try:
            with warnings.catch_warnings(), _quiet_pydicom_log(logging.CRITICAL):
                warnings.simplefilter("ignore")
                for arr in iter_pixels(source, indices=range(k, n)):
                    view = _frame_view(ds, k)
                    try:
                        unit, how = _unit(arr, ds, view, h.rows, h.cols)
                        images[len(out.index)] = to_uint16(fit_square(unit, size))
                        out.index.append(k)
                        out.metas.append({**frame_meta(view, k), **how})
                    except SkipImage as skip:
                        out.skipped.append((k, skip.reason, skip.detail))
                    k += 1
        except BaseException as exc:  # noqa: BLE001 - a corrupt frame costs that frame; decoding goes on after it
            reraise_fatal(exc)
            skip = skip_from(exc, f"frame {k}: {h.transfer_syntax_name}")
            failures += 1
            if failures >= 3 and not out.index:  # the object, not a frame, is broken: same reason for the rest
                out.skipped.extend((j, skip.reason, skip.detail) for j in range(k, n))
                break
            out.skipped.append((k, skip.reason, skip.detail))
            k += 1
    if not out.index:
        _k, reason, detail = out.skipped[0] if out.skipped else (0, "decode-failed", "no frame decoded")
        raise SkipImage(reason, f"every frame unusable; frame {_k}: {detail}"[:240])
    out.images = images[: len(out.index)]
    return out


def decode_item(path: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                ) -> tuple[np.ndarray | Frames, HeaderInfo]:
    """One file -> (float32 [size, size] image, header) for a single frame, or (Frames, header) for a
    multi-frame object (uint16 frames, memory bounded by one decoded frame plus the small outputs)."""
    ds, h = _parse(path, max_pixels)
    return (_single(ds, h, size) if h.frames == 1 else _frames(ds, h, size)), h


def decode_with_header(path: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                       ) -> tuple[np.ndarray, HeaderInfo]:
    """decode_dicom plus the header it read on the way (one file read for both: the cache stores both)."""
    ds, h = _parse(path, max_pixels, frames_ok=False)
    return _single(ds, h, size), h


def decode_dicom(path: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 ) -> np.ndarray:
    """float32 [size, size] in [0, 1]: Modality LUT, VOI LUT/window (else robust min-max), MONOCHROME1
    inverted, colour as luminance, aspect kept and zero-padded to a square. Raises SkipImage for anything
    unusable, `multi-frame` for a multi-frame object (decode_item reads those)."""
    return decode_with_header(path, size, max_pixels)[0]


def check_dicom(path: str | os.PathLike[str] | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> HeaderInfo:
    """Header plus every structural check decode_item makes, without decoding pixels (`scan --no-decode`).

    Catches missing pixels, over-budget sizes, unsupported colour models, short Pixel Data and missing codecs;
    only a corrupt compressed bitstream needs a real decode to be found.
    """
    return _parse(path, max_pixels)[1]
