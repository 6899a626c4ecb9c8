"""Image sources: one reader interface, the readers, the layout dispatch and the ingestion contract.

Public names: Reader, Item, Listing (base); Inventory (inventory: a reader's part of `fedrad scan`);
detect_source, open_source, Layout (layout); SkipImage, REASONS (errors); DEFAULT_MAX_PIXELS (budget);
DicomFolderReader, ImageFolderReader; PACS sources
(pacs: PacsOptions, PacsQuery, PacsError, is_source_url; layout: open_pacs). Imported lazily so that
`fedrad.common.dicom_io` (which the readers wrap) can import `sources.errors` without a cycle.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Reader": "base", "Item": "base", "Listing": "base", "Inventory": "inventory",
    "detect_source": "layout", "open_source": "layout", "Layout": "layout",
    "SkipImage": "errors", "REASONS": "errors", "skip_from": "errors",
    "DEFAULT_MAX_PIXELS": "budget",
    "DicomFolderReader": "dicom_folder", "ImageFolderReader": "image_folder",
    "PacsOptions": "pacs", "PacsQuery": "pacs", "PacsError": "pacs", "is_source_url": "pacs", "open_pacs": "layout",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
