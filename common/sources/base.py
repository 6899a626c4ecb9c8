"""The reader interface every image source implements: list items, a stable id per item, decode one item.

A source is anything that yields radiographs: a DICOM folder, a PNG/JPEG folder with a CSV, and later a
PACS (DICOMweb / DIMSE) where an item is a SOP Instance UID fetched from a server. The cache and the site
loader only talk to this interface, so a new source is one new module here plus one line in layout.py.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.walk import Problem


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
    """A source of radiographs. Subclasses set `kind` and implement `list_items`, `entry` and `check`.

    `entry(locator, size, salt, max_pixels)` and `check(locator, max_pixels)` are module-level functions
    (staticmethods), because they run in decode worker processes under a memory limit: they must pickle,
    and they raise only SkipImage.
    """

    kind: str = ""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = int(max_pixels)

    @abc.abstractmethod
    def list_items(self) -> Listing:
        """Every item of the source, in a stable order."""

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
