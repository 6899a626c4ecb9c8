"""A DICOM folder: walked recursively, any file names (PACS exports often have no extension).

Files whose extension says they are documentation (CSV, text) are `ignored` (listed, not counted as
images); files that are images or volumes fedrad has no reader for (NIfTI `.nii`/`.nii.gz`, archives,
PNG without a manifest, TIFF) are skipped as `unsupported-format`, never silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedrad.common.header_signals import patient_key
from fedrad.common.sources.base import Frames, Item, Listing, Reader
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.walk import DirCheck, Problem, walk_folder

# Certainly not image data: listed as ignored.
NOT_IMAGE_EXTS = {
    ".csv", ".md", ".txt", ".json", ".xml", ".html", ".htm", ".pdf", ".py", ".sh", ".bat", ".exe", ".log",
    ".ini", ".cfg", ".yaml", ".yml", ".toml", ".db", ".safetensors", ".pt", ".lock",
}
NOT_IMAGE_NAMES = {"DICOMDIR", "Thumbs.db", "desktop.ini"}
# Image or volume formats without a reader in a DICOM folder: skipped with reason unsupported-format.
UNSUPPORTED_EXTS = {
    ".nii": "NIfTI volume", ".gz": "compressed file (e.g. .nii.gz)", ".tgz": "archive", ".zip": "archive",
    ".tar": "archive", ".7z": "archive", ".bz2": "compressed file", ".xz": "compressed file",
    ".nrrd": "NRRD volume", ".mha": "MetaImage volume", ".mhd": "MetaImage volume", ".npz": "numpy array",
    ".npy": "numpy array", ".bmp": "bitmap", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF",
    ".png": "PNG without manifest.csv", ".jpg": "JPEG without manifest.csv", ".jpeg": "JPEG without manifest.csv",
}


def classify(path: Path | str) -> tuple[str, str]:
    """('candidate' | 'ignored' | 'unsupported-format', detail) from a file's name alone (pathlib's suffix
    rules, on the string: a walk of 10^6 files makes no Path objects)."""
    name = os.path.basename(path)
    dot = name.rfind(".")
    ext = name[dot:].lower() if 0 < dot < len(name) - 1 else ""
    if ext == ".gz" and not name.endswith(".") and "".join(
            "." + s for s in name.lstrip(".").split(".")[1:][-2:]).lower() == ".nii.gz":
        return "unsupported-format", "NIfTI volume (.nii.gz)"
    if ext in NOT_IMAGE_EXTS or name in NOT_IMAGE_NAMES:
        return "ignored", ""
    if ext in UNSUPPORTED_EXTS:
        return "unsupported-format", UNSUPPORTED_EXTS[ext]
    return "candidate", ""


def dicom_entry(path: str, size: int, salt: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                ) -> tuple[np.ndarray | Frames, dict]:
    """Pixels (one image, or every frame of a multi-frame object) plus header metadata, with the raw
    PatientID replaced by its salted key."""
    from fedrad.common.dicom_io import decode_item

    img, h = decode_item(path, size, max_pixels)
    meta = h.as_dict()
    pid, study = meta.pop("patient_id"), meta.pop("study_uid")
    # No PatientID and no study: a key of its own (by SOP UID or path), never one shared 'unknown' group.
    meta["patient_key"] = patient_key(pid, study or h.sop_uid or f"path:{path}", salt)
    meta["study_key"] = patient_key(None, study, salt) if study else ""  # studies counted, never named
    return img, meta


def dicom_check(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Header fields plus every structural check, pixels not decoded."""
    from fedrad.common.dicom_io import check_dicom

    return check_dicom(path, max_pixels).as_dict()


class DicomFolderReader(Reader):
    """Every DICOM file under a folder; item id = path relative to the folder (stable when it moves)."""

    kind = "dicom"
    entry = staticmethod(dicom_entry)
    check = staticmethod(dicom_check)

    def __init__(self, root: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                 labels_csv: str | os.PathLike[str] | None = None) -> None:
        super().__init__(max_pixels, labels_csv)
        self.root = Path(root).resolve()

    def list_items(self, known: DirCheck | None = None) -> Listing:
        """Every file under the folder; `known` (walk_folder's) leaves out the files of unchanged folders."""
        walk = walk_folder(self.root, known)
        out = Listing(folders=walk.folders, skipped=list(walk.problems),
                      files_seen=len(walk.paths) + len(walk.problems), dirs=walk.dirs, unchanged=walk.unchanged)
        cut = len(os.path.join(str(self.root), ""))
        for p in walk.paths:
            rel = p[cut:] if os.sep == "/" else p[cut:].replace(os.sep, "/")
            kind, detail = classify(p)
            if kind == "candidate":
                out.items.append(Item(rel, p))
            elif kind == "ignored":
                out.ignored.append(rel)
            else:
                out.skipped.append(Problem(rel, kind, detail))
        return out
