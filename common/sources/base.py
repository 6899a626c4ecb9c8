"""The reader interface every image source implements: list items, a stable id per item, decode one item.

A source is anything that yields radiographs: a DICOM folder, a PNG/JPEG folder with a CSV, and later a
PACS (DICOMweb / DIMSE) where an item is a SOP Instance UID fetched from a server. The cache and the site
loader only talk to this interface, so a new source is one new module here plus one line in layout.py.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.inventory import Inventory, header_inventory
from fedrad.common.sources.walk import Problem


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV (a manifest or a labels file), keys and values stripped."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def csv_columns(path: Path) -> list[str]:
    """A CSV's header (its column names, stripped); [] when it cannot be read."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


@dataclass(frozen=True)
class Item:
    """One image of a source.

    `item_id` is stable for as long as the image exists in the source (relative POSIX path in a folder, SOP
    Instance UID on a PACS): labels and reports refer to it. `locator` is what the decoder needs to get the
    bytes (an absolute path here; a URL or UID for a server). `fingerprint` identifies the content: '' means
    "a local file: the cache hashes its bytes"; a server source sets it from what the server says.
    """

    item_id: str
    locator: str
    fingerprint: str = ""


@dataclass
class Frames:
    """What `entry` returns for a multi-frame object instead of one image: every usable frame (uint16, value
    / 65535 in [0, 1]), which frame each row is with its own fields (position, orientation), and the frames
    skipped with their reason. The cache stores each frame as its own entry (`<fingerprint>#f<k>`)."""

    images: np.ndarray  # uint16 [len(index), size, size]
    index: list[int]
    metas: list[dict]
    skipped: list[tuple[int, str, str]]  # (frame, reason, detail)
    total: int


@dataclass
class Listing:
    """What a source holds: items to decode, and everything else, each with a reason (nothing vanishes)."""

    items: list[Item] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)  # found, not decodable: unsupported-format, unreadable
    ignored: list[str] = field(default_factory=list)  # certainly not images (CSV, text): listed, not counted
    folders: list[Problem] = field(default_factory=list)  # parts of the source that could not be walked
    files_seen: int = 0
    dirs: list[tuple[str, int, int]] = field(default_factory=list)  # folders walked (see walk.Walk.dirs)
    unchanged: list[str] = field(default_factory=list)  # folders whose files were not listed (walk.Walk)


class Reader(abc.ABC):
    """A source of radiographs. Subclasses set `kind` and implement `list_items`, `entry` and `check`; a source
    whose items carry no header signals also says what its layout holds for `fedrad scan` (`inventory`).

    `entry(locator, size, salt, max_pixels)` and `check(locator, max_pixels)` are module-level functions
    (staticmethods), because they run in decode worker processes under a memory limit: they must pickle,
    and they raise only SkipImage.
    """

    kind: str = ""
    # True: `entry` reads header signals (modality, body part, view, sex, age, patient) from each file; False: the
    # source's labels and patients come from its own table (a PNG/JPEG manifest).
    has_headers: bool = True
    # A labels CSV the site added to this source (None: none): a row matches an item by its path relative to
    # the source's root (`file`) or by its SOP Instance UID (`sop_uid`).
    labels_csv: Path | None = None
    root: Path

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, labels_csv: str | os.PathLike[str] | None = None,
                 ) -> None:
        self.max_pixels = int(max_pixels)
        self.labels_csv = Path(labels_csv) if labels_csv else None

    def _csv_layout(self, header: list[str]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(path key columns, columns that are not labels, what a CSV without a key needs) of a labels CSV."""
        return ("file",), ("file", "sop_uid"), "a 'file' or 'sop_uid' column"

    def csv_labels(self, locators: list[str], sops: list[str] | None = None) -> dict[str, list[str]]:
        """The labels CSV's columns for these items, aligned with `locators` ('' = not labelled); {} without one.

        The reader owns its labels: site data and fine-tuning ask it instead of branching on the layout."""
        if self.labels_csv is None:
            return {}
        rows = read_csv(self.labels_csv)
        if not rows:
            return {}
        path_keys, not_labels, needs = self._csv_layout(list(rows[0]))
        by_path = {str((self.root / r[k]).resolve()): r for k in path_keys for r in rows if r.get(k)}
        by_sop = {r["sop_uid"]: r for r in rows if r.get("sop_uid")} if "sop_uid" in not_labels else {}
        if not by_path and not by_sop:
            raise ValueError(f"{self.labels_csv}: needs {needs}")
        cols = [c for c in rows[0] if c not in (*not_labels, "")]
        sops = sops if sops is not None else [""] * len(locators)
        matched = [by_path.get(str(Path(p).resolve())) or by_sop.get(sop) or {}
                   for p, sop in zip(locators, sops, strict=True)]
        return {c: [row.get(c, "") for row in matched] for c in cols}

    @abc.abstractmethod
    def list_items(self) -> Listing:
        """Every item of the source, in a stable order."""

    def inventory(self, listing: Listing, results: list[dict], salt: bytes) -> Inventory:
        """What this source's layout adds to `fedrad scan`'s report (common/sources/inventory.py), from its
        listing and the scan's record of each item (`results[i]` for `listing.items[i]`); `salt` keys patients.

        The reader owns its inventory: the scan does not branch on the layout. This default is a source whose
        items carry header signals (a DICOM folder, a PACS): their counts, the labels CSV, volumes."""
        return header_inventory(listing, results, self.labels_csv)

    @staticmethod
    @abc.abstractmethod
    def entry(locator: str, size: int, salt: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
              ) -> tuple[np.ndarray, dict]:
        """Decode one item: (float32 [size, size] in [0, 1], header signals as a JSON-able dict); a
        multi-frame object gives a `Frames` instead of the single image.

        The signals never hold a raw patient identifier: `patient_key` is salted with `salt`."""

    @staticmethod
    @abc.abstractmethod
    def check(locator: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
        """Header signals plus every check `entry` makes short of decoding pixels (raw patient fields
        `patient_id`/`study_uid` included: the caller salts and drops them)."""

    def decode(self, item: Item, size: int, salt: bytes = b"") -> tuple[np.ndarray, dict]:
        """`entry` for one item in this process (no worker isolation): tools and tests."""
        return self.entry(item.locator, size, salt, self.max_pixels)
