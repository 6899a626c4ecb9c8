"""`fedrad ingest`: build or update a site's decoded image store before and between rounds (issue 26).

Why: a round must not decode a hospital's archive inside its first message (10^6 JPEG 2000 films take days).
Ingest decodes every file not stored yet with every core (the isolated decode workers), in batches that are
each committed as one append-only chunk plus one index transaction (common/cache.py): killed at any point,
a rerun decodes only what was never committed. It uses the node's salt (state folder), cache folder and
pixel budget, so the node finds the images stored under the same keys. Memory stays bounded: the listing
is walked once, then decoded SLICE files at a time.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedrad.client.site.site_data import default_cache_dir
from fedrad.client.site.site_state import default_state_dir
from fedrad.common.cache import DecodedCache
from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.layout import open_location
from fedrad.common.sources.walk import display_name

log = logging.getLogger("fedrad.ingest")
SLICE = 16384  # files planned and decoded per pass: bounds the memory of one pass, one worker pool each


def ingest_site(data_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
                state_dir: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True, workers: int | None = None) -> dict[str, int | float]:
    """Decode every file of the site folder not stored yet; returns counts (files, decoded, stored_before...)."""
    opened = open_location(data_dir, max_pixels, cache_dir, None)
    root = opened.root
    cdir = opened.cache_dir or (Path(cache_dir) if cache_dir else default_cache_dir(root))
    state = Path(state_dir) if state_dir else default_state_dir(root)
    cache = DecodedCache(cdir, image_size, decoder=opened.reader.entry, workers=workers, state_dir=state,
                         max_pixels=max_pixels)
    t0 = time.perf_counter()
    listing = opened.reader.list_items()
    items = listing.items
    total = {"files": len(items), "decoded": 0, "stored_before": 0, "changed_while_read": 0,
             "not_images": len(listing.skipped)}
    log.info("ingest: %d files found under %s (%d not decodable images), store %s", len(items),
             display_name(str(root)), len(listing.skipped), display_name(str(cache.dir)))
    try:
        for start in range(0, len(items), SLICE):
            done = cache.ingest(items[start:start + SLICE], progress=progress)
            for k in ("decoded", "stored_before", "changed_while_read"):
                total[k] += done[k]
            rate = total["decoded"] / max(1e-9, time.perf_counter() - t0)
            log.info("ingest: %d/%d files stored (%d decoded by this run, %.1f files/s)",
                     min(start + SLICE, len(items)), len(items), total["decoded"], rate)
    finally:
        cache.close()
    total["seconds"] = round(time.perf_counter() - t0, 3)
    return total
