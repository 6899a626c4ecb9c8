"""The pixel budget: how big an image may claim to be before any decoder is allowed to touch it.

A 5 KB RLE file can declare 65535 x 65535 pixels and a 610-byte JPEG 2000 codestream 16384 x 16384; a
decoder trusts those numbers and allocates gigabytes. So the size is checked twice before decoding: from the
DICOM header (rows x columns x frames x samples, and the bytes that makes at BitsAllocated) and from the
codec's own header inside the first fragment (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment count),
which must agree with the DICOM header. The parsers read at most a few KB and never raise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fedrad.common.sources.errors import SkipImage

DEFAULT_MAX_PIXELS = 64 << 20  # 64 Mpixel: a 4k x 4k film is 16 Mpixel; the site policy may change it
BYTES_PER_PIXEL_BUDGET = 4  # stored bytes allowed per budget pixel (32-bit samples at most)
_SCAN_LIMIT = 1 << 16  # bytes of a codestream searched for its size marker

# JPEG start-of-frame markers (all processes, incl. lossless), and JPEG-LS SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


@dataclass(frozen=True)
class CodecSize:
    """What a compressed bitstream says about itself: width, height and components (0 = not declared)."""

    codec: str
    width: int
    height: int
    components: int


def check_pixel_budget(rows: int, cols: int, frames: int = 1, samples: int = 1, bits_allocated: int = 16,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise SkipImage('too-large') if the header's geometry is over the budget (pure arithmetic)."""
    rows, cols, frames, samples = (max(0, int(v)) for v in (rows, cols, frames, samples))
    pixels = rows * cols * max(1, frames) * max(1, samples)
    if pixels > max_pixels:
        raise SkipImage("too-large", f"{rows}x{cols} x {frames} frame(s) x {samples} sample(s) = "
                                     f"{pixels / 2**20:.1f} Mpixel, budget {max_pixels / 2**20:.0f} Mpixel")
    nbytes = pixels * max(1, (int(bits_allocated) + 7) // 8)
    if nbytes > max_pixels * BYTES_PER_PIXEL_BUDGET:
        raise SkipImage("too-large", f"{nbytes / 2**20:.0f} MiB of samples at BitsAllocated={bits_allocated}")


def jpeg_size(data: bytes) -> CodecSize | None:
    """Size from a JPEG (ISO 10918, any process) or JPEG-LS stream's SOF segment; None if not found."""
    if data[:2] != b"\xff\xd8":
        return None
    i, end = 2, min(len(data), _SCAN_LIMIT)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF and i + 10 <= len(data):
            _p, height, width, nf = struct.unpack(">BHHB", data[i + 4 : i + 10])
            return CodecSize("jpeg-ls" if marker == 0xF7 else "jpeg", width, height, nf)
        if marker == 0xDA or length < 2:  # start of scan before any frame header: malformed
            return None
        i += 2 + length
    return None


def j2k_size(data: bytes) -> CodecSize | None:
    """Size from a JPEG 2000 codestream's SIZ segment (also inside a JP2 wrapper); None if not found."""
    at = data.find(b"\xff\x4f\xff\x51", 0, _SCAN_LIMIT)
    if at < 0 or at + 42 > len(data):
        return None
    s = at + 4
    (_lsiz, _rsiz, xsiz, ysiz, xo, yo, _xt, _yt, _xto, _yto, csiz) = struct.unpack(">HHIIIIIIIIH", data[s : s + 38])
    return CodecSize("jpeg2000", max(0, xsiz - xo), max(0, ysiz - yo), csiz)


def rle_segments(data: bytes) -> int | None:
    """Number of segments an RLE Lossless frame header declares (1-15 valid); None if too short."""
    if len(data) < 64:
        return None
    return struct.unpack("<I", data[:4])[0]


def first_fragment(pixel_data: bytes) -> bytes:
    """The first non-empty fragment of encapsulated Pixel Data (after the basic offset table), or b''."""
    i, n, seen = 0, len(pixel_data), 0
    while i + 8 <= n and seen < 64:
        group, elem, length = struct.unpack("<HHI", pixel_data[i : i + 8])
        if (group, elem) != (0xFFFE, 0xE000):
            return b""
        i += 8
        if seen > 0 and length:
            return pixel_data[i : i + min(length, _SCAN_LIMIT)]
        i += length
        seen += 1
    return b""


def check_codec_size(syntax_kind: str, fragment: bytes, rows: int, cols: int, samples: int, bits_allocated: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> CodecSize | None:
    """Compare the codec's declared geometry with the budget and the DICOM header before decoding.

    `syntax_kind` is 'jpeg', 'jpeg2000', 'rle' (or anything else: nothing to check). Raises SkipImage
    ('too-large' over budget, 'bad-dimensions' when the codestream disagrees with Rows/Columns).
    """
    if syntax_kind == "rle":
        segs = rle_segments(fragment)
        want = max(1, samples) * max(1, (bits_allocated + 7) // 8)
        if segs is not None and segs != want:
            raise SkipImage("bad-dimensions", f"RLE header declares {segs} segments, header implies {want}")
        return None
    size = jpeg_size(fragment) if syntax_kind == "jpeg" else j2k_size(fragment) if syntax_kind == "jpeg2000" \
        else None
    if size is None:
        return None
    if size.width * max(1, size.height) * max(1, size.components) > max_pixels:
        raise SkipImage("too-large", f"{size.codec} codestream declares {size.width}x{size.height}"
                                     f"x{size.components}, budget {max_pixels / 2**20:.0f} Mpixel")
    # height 0 is legal in JPEG (a DNL marker gives it later); components may differ (YBR in J2K MCT).
    if size.width != cols or (size.height and size.height != rows):
        raise SkipImage("bad-dimensions", f"{size.codec} codestream is {size.width}x{size.height}, "
                                          f"header says {cols}x{rows}")
    return size
