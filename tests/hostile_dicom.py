"""A folder of hostile and odd DICOM files (issue 12): bombs, odd depths, bad names, loops, NIfTI.

`make_hostile_folder(root)` writes the files and returns {relative name as scan displays it: expected
status}, where the status is a SkipImage reason or 'ok'. Compressed bombs carry a tiny codestream whose own
header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment table) declares a huge image, so only a check
before the decoder keeps memory bounded. Also usable from the command line to build a folder by hand:
`python tests/hostile_dicom.py OUT_DIR`.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np

RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"


def _ds(rows=64, cols=64, ts="1.2.840.10008.1.2.1", bits=16, stored=12, photometric="MONOCHROME2", spp=1,
        frames=None, pixels=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "HOSTILE"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, max(0, stored - 1), 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixels is None:
        arr = (np.arange(rows * cols * spp) % 4000).astype(np.uint16 if bits == 16 else np.uint8)
        pixels = arr.tobytes()
    ds.PixelData = pixels
    return ds


def _save(ds, path: Path, encapsulated: bool = False) -> None:
    if encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, little_endian=True, implicit_vr=False)


def _encap(frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    return encapsulate([frame])


def jpeg_stream(width: int, height: int, sof: int = 0xC0, components: int = 1) -> bytes:
    """SOI + a frame header declaring width x height + EOI: a decoder would allocate from it."""
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    seg = struct.pack(">BHHB", 8, height, width, components) + comps
    return b"\xff\xd8" + bytes([0xFF, sof]) + struct.pack(">H", 2 + len(seg)) + seg + b"\xff\xd9"


def j2k_stream(width: int, height: int) -> bytes:
    """SOC + SIZ declaring width x height (one 16-bit component) + a minimal COD/QCD + EOC."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1) + bytes([15, 1, 1])
    cod = b"\xff\x52" + struct.pack(">HBBHBBBBBB", 12, 0, 0, 1, 0, 5, 4, 4, 0, 0)
    qcd = b"\xff\x5c" + struct.pack(">HB", 4, 0x40) + b"\x40"
    return b"\xff\x4f\xff\x51" + siz + cod + qcd + b"\xff\xd9"


def make_hostile_folder(root: str | os.PathLike[str], unreadable_folder: bool = True) -> dict[str, str]:
    """Write the hostile folder; returns {displayed relative name: expected status}."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, str] = {}

    # -- decompression bombs -------------------------------------------------------------------
    rle_header = struct.pack("<16I", 2, 64, *([0] * 14)) + b"\x00" * 8
    _save(_ds(65535, 65535, RLE, pixels=_encap(rle_header)), root / "bombs" / "rle_65535.dcm", True)
    exp["bombs/rle_65535.dcm"] = "too-large"
    # header small, codestream huge: only the codec check catches these
    for name, ts, stream in (
        ("jpeg_baseline.dcm", JPEG_BASELINE, jpeg_stream(60000, 60000, 0xC0)),
        ("jpeg_lossless.dcm", JPEG_LOSSLESS, jpeg_stream(60000, 60000, 0xC3)),
        ("jpeg_ls.dcm", JPEG_LS, jpeg_stream(60000, 60000, 0xF7)),
        ("j2k_16384.dcm", J2K, j2k_stream(16384, 16384)),
    ):
        bits = 8 if ts == JPEG_BASELINE else 16
        _save(_ds(64, 64, ts, bits=bits, stored=8 if bits == 8 else 12, pixels=_encap(stream)),
              root / "bombs" / name, True)
        exp[f"bombs/{name}"] = "too-large"
    # header and codestream agree on a huge size
    _save(_ds(16384, 16384, J2K, pixels=_encap(j2k_stream(16384, 16384))), root / "bombs" / "j2k_header_big.dcm",
          True)
    exp["bombs/j2k_header_big.dcm"] = "too-large"
    # codestream disagrees with the header but is within budget
    _save(_ds(64, 64, J2K, pixels=_encap(j2k_stream(100, 50))), root / "bombs" / "j2k_mismatch.dcm", True)
    exp["bombs/j2k_mismatch.dcm"] = "bad-dimensions"
    # RLE with a segment table that does not fit the header (3 segments for 16-bit mono)
    rle3 = struct.pack("<16I", 3, 64, 64, 64, *([0] * 12)) + b"\x00" * 8
    _save(_ds(64, 64, RLE, pixels=_encap(rle3)), root / "bombs" / "rle_segments.dcm", True)
    exp["bombs/rle_segments.dcm"] = "bad-dimensions"
    # uncompressed, huge declared geometry with short data
    _save(_ds(60000, 60000, pixels=b"\x00" * 1024), root / "bombs" / "raw_60000.dcm")
    exp["bombs/raw_60000.dcm"] = "too-large"
    _save(_ds(512, 512, frames=100000, pixels=b"\x00" * 1024), root / "bombs" / "frames_100000.dcm")
    exp["bombs/frames_100000.dcm"] = "too-large"

    # -- odd depths, syntaxes, colour ------------------------------------------------------------
    _save(_ds(32, 32, bits=12, stored=12, pixels=b"\x01" * (32 * 32 * 2)), root / "odd" / "bits_alloc_12.dcm")
    exp["odd/bits_alloc_12.dcm"] = "bad-dimensions"
    _save(_ds(32, 32, bits=16, stored=24), root / "odd" / "stored_gt_alloc.dcm")
    exp["odd/stored_gt_alloc.dcm"] = "bad-dimensions"
    ds = _ds(32, 32, bits=16, stored=13)
    ds.PixelRepresentation = 1
    ds.PixelData = (np.arange(32 * 32, dtype=np.int16) - 400).tobytes()
    _save(ds, root / "odd" / "signed_13bit.dcm")
    exp["odd/signed_13bit.dcm"] = "ok"
    ds = _ds(32, 32, bits=1, stored=1, pixels=np.packbits(np.arange(32 * 32) % 3 == 0, bitorder="little").tobytes())
    _save(ds, root / "odd" / "one_bit.dcm")
    exp["odd/one_bit.dcm"] = "ok"
    _save(_ds(32, 32, ts="1.2.3.4.5.6.7"), root / "odd" / "unknown_syntax.dcm")
    exp["odd/unknown_syntax.dcm"] = "unsupported-syntax"
    ds = _ds(32, 32, bits=8, stored=8, photometric="PALETTE COLOR", pixels=bytes(range(256)) * 4)
    _save(ds, root / "odd" / "palette.dcm")
    exp["odd/palette.dcm"] = "colour"
    _save(_ds(16, 16, bits=8, stored=8, photometric="YBR_FULL", spp=3, pixels=bytes(16 * 16 * 3)),
          root / "odd" / "ybr.dcm")
    exp["odd/ybr.dcm"] = "colour"
    ds = _ds(32, 32)
    ds.RescaleSlope, ds.RescaleIntercept = "0", "0"
    _save(ds, root / "odd" / "slope_zero.dcm")
    exp["odd/slope_zero.dcm"] = "blank"
    _save(_ds(32, 32, pixels=np.full(32 * 32, 77, np.uint16).tobytes()), root / "odd" / "constant.dcm")
    exp["odd/constant.dcm"] = "blank"
    ds = _ds(32, 32)
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(60):  # 60 nested sequences: parsers recurse per level
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    _save(ds, root / "odd" / "deep_sequence.dcm")
    exp["odd/deep_sequence.dcm"] = "ok"
    # an element whose length does not fit its VR (US with 3 bytes): pydicom raises BytesLengthException
    good = root / "odd" / "_tmp.dcm"
    _save(_ds(32, 32), good)
    data = bytearray(good.read_bytes())
    at = data.find(struct.pack("<HH", 0x0028, 0x0010) + b"US")
    data[at + 6 : at + 8] = struct.pack("<H", 3)
    (root / "odd" / "us_length_3.dcm").write_bytes(bytes(data))
    good.unlink()
    exp["odd/us_length_3.dcm"] = "*"  # any listed reason: the point is that it is a reason, not a crash

    # -- names, links, formats -----------------------------------------------------------------------
    names = root / "names"
    names.mkdir()
    latin1 = os.fsencode(str(names)) + b"/M\xfcller.dcm"
    _save(_ds(16, 16), Path(os.fsdecode(latin1)))
    exp["names/M\\xfcller.dcm"] = "ok"
    _save(_ds(16, 16), names / "line\nbreak.dcm")
    exp["names/line\\x0abreak.dcm"] = "ok"
    _save(_ds(16, 16), names / "esc\x1b[31mred.dcm")
    exp["names/esc\\x1b[31mred.dcm"] = "ok"
    (root / "vol.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 60)
    exp["vol.nii.gz"] = "unsupported-format"
    os.symlink("loop.dcm", root / "loop.dcm")
    exp["loop.dcm"] = "unreadable"
    os.symlink("..", names / "up")  # a folder link back up: not followed, reported
    if unreadable_folder:
        locked = root / "locked"
        _save(_ds(16, 16), locked / "inside.dcm")
        os.chmod(locked, 0)
    return exp


if __name__ == "__main__":
    print(make_hostile_folder(sys.argv[1]))
