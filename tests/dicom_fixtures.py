"""Shared helpers for the ingestion tests: the real shared data folder and corrupt DICOM files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """FEDRAD_SHARED_DATA, else <repo>/../shared/data; skips the test when absent."""
    root = Path(os.environ.get("FEDRAD_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (root / "dicom" / "INDEX.csv").is_file():
        pytest.skip(f"shared DICOM data not found at {root}")
    return root


def dicom_index() -> list[dict[str, str]]:
    with open(shared_data() / "dicom" / "INDEX.csv", newline="") as f:
        return list(csv.DictReader(f))


def small_dicom(path: Path, rows: int = 32, cols: int = 24, photometric: str = "MONOCHROME2",
                pixels: bool = True, patient_id: str = "P1", value: int | None = None) -> Path:
    """A valid small uncompressed 16-bit DICOM with a gradient (or constant `value`)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientAge, ds.PatientSex = "CR", patient_id, "045Y", "F"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels:
        arr = np.full((rows, cols), value, np.uint16) if value is not None else \
            np.linspace(0, 4095, rows * cols).reshape(rows, cols).astype(np.uint16)
        ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_corrupt_files(folder: Path) -> dict[str, str]:
    """Write one file per corruption kind into `folder`; returns {file name: expected reason}."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    good = small_dicom(folder / "_good_src.tmp", rows=64, cols=64)
    data = good.read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) - 3000])
    (folder / "zero.dcm").write_bytes(b"")
    (folder / "notes.dcm").write_text("this is a text file, not DICOM\n" * 20)
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    ds = pydicom.dcmread(good)
    ds.Rows = 128  # PixelData now too short for Rows x Columns
    ds.save_as(folder / "wrongdims.dcm")
    good.unlink()
    return {"truncated.dcm": "truncated", "zero.dcm": "empty-file", "notes.dcm": "not-dicom",
            "nopixels.dcm": "no-pixel-data", "wrongdims.dcm": "bad-dimensions"}
