"""`fedrad ingest`: build or update a site's decoded image store before and between rounds (issue 26).

Why: a round must not decode a hospital's archive inside its first message (10^6 JPEG 2000 films take days).
Ingest decodes every file not stored yet with every core (the isolated decode workers), in batches that are
each committed as one append-only chunk plus one index transaction (common/cache.py): killed at any point,
a rerun decodes only what was never committed. It uses the node's salt (state folder), cache folder and
pixel budget, so the node finds the images stored under the same keys. Memory stays bounded: the listing
is walked once, then decoded SLICE files at a time.
Quick pass (the default for a DICOM folder): the store remembers each folder's mtime and inode once all its
files are stored, and a later pass lists and stats only the files of folders that changed since (a file
added, removed or renamed changes its folder's mtime), so picking up one new film does not stat 10^5 others.
A file rewritten in place under the same name does not change its folder: `full=True` (`--full`) walks and
stats every file, and a quick pass becomes full by itself when the last full one is older than FULL_EVERY_S.
`compact=True` (`--compact`) then rewrites the store without the images of deleted files (store_compact).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedrad.client.site.site_data import default_cache_dir
from fedrad.client.site.site_state import default_state_dir
from fedrad.common.cache import DecodedCache
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.dicom_folder import DicomFolderReader
from fedrad.common.sources.layout import open_location
from fedrad.common.sources.walk import display_name

log = logging.getLogger("fedrad.ingest")
SLICE = 16384  # files planned and decoded per pass: bounds the memory of one pass, one worker pool each
FULL_EVERY_S = 24 * 3600  # a quick pass walks every file anyway when the last full pass is older than this


def ingest_site(data_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
                state_dir: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True, workers: int | None = None, full: bool = False,
                compact: bool = False) -> dict[str, int | float]:
    """Decode every file of the site folder not stored yet; returns counts (files, decoded, stored_before...).

    `full`: stat every file (else folders unchanged since a pass stored all their files are skipped);
    `compact`: afterwards rewrite the store without the images of files no longer in the folder (raises
    store_compact.CompactRefused while a round or another ingest uses the store)."""
    opened = open_location(data_dir, max_pixels, cache_dir, None)
    root = opened.root
    cdir = opened.cache_dir or (Path(cache_dir) if cache_dir else default_cache_dir(root))
    state = Path(state_dir) if state_dir else default_state_dir(root)
    cache = DecodedCache(cdir, image_size, decoder=opened.reader.entry, workers=workers, state_dir=state,
                         max_pixels=max_pixels)
    t0 = time.perf_counter()
    try:
        total = _ingest(cache, opened.reader, root, full or compact, progress)
    finally:
        cache.close()
    if compact:
        from fedrad.common.store_compact import compact_store

        total.update(compact_store(cdir, image_size, opened.reader, state_dir=state, max_pixels=max_pixels))
    total["seconds"] = round(time.perf_counter() - t0, 3)
    return total


def _ingest(cache: DecodedCache, reader, root: Path, full: bool, progress: bool) -> dict:
    quick = isinstance(reader, DicomFolderReader)  # the folder memo needs a walked folder
    last = cache.last_full_pass() if quick else None
    full = full or not quick or last is None or time.time() - last > FULL_EVERY_S
    t0 = time.perf_counter()
    listing = reader.list_items(None if full else cache.dir_known) if quick else reader.list_items()
    items = listing.items
    total = {"files": len(items), "decoded": 0, "stored_before": 0, "changed_while_read": 0,
             "not_images": len(listing.skipped), "full_pass": int(full), "folders_unchanged": len(listing.unchanged)}
    log.info("ingest (%s pass): %d files found under %s (%d not decodable images; %d unchanged folders not "
             "listed), store %s", "full" if full else "quick", len(items), display_name(str(root)),
             len(listing.skipped), len(listing.unchanged), display_name(str(cache.dir)))
    for start in range(0, len(items), SLICE):
        done = cache.ingest(items[start:start + SLICE], progress=progress)
        for k in ("decoded", "stored_before", "changed_while_read"):
            total[k] += done[k]
        rate = total["decoded"] / max(1e-9, time.perf_counter() - t0)
        log.info("ingest: %d/%d files stored (%d decoded by this run, %.1f files/s)",
                 min(start + SLICE, len(items)), len(items), total["decoded"], rate)
    if quick:  # every file of these folders is now stored or skipped with its reason
        changed = {os.path.dirname(p) for p in cache.changed_paths}
        unchanged = set(listing.unchanged)
        cache.remember_dirs([d for d in listing.dirs if d[0] not in changed and d[0] not in unchanged], full)
    return total

