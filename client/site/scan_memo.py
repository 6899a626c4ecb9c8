"""What a decoding `fedrad scan` proved about each file, so a second scan of an unchanged folder decodes nothing.

Why (issue 26): proving that every film decodes costs a full decode (3.5 JPEG 2000 films/s on 2 cores); an
unchanged file (same path, size, mtime and inode) keeps its outcome, so the next scan reads its header (or,
for a file known to be unusable, only its stat). Only the decode outcome is kept (usable or the skip
reason, and a multi-frame object's frame counts and geometry), never a header identifier: each scan salts
patients afresh. Stored as SQLite (WAL) `scan.sqlite` in the site's cache folder, 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedrad.common.wal_db import open_wal

KEPT = ("ok", "reason", "detail", "frames_ok", "frame_metas", "frames_skipped")
NOT_KEPT_REASONS = {"out-of-memory", "decoder-crashed"}  # about the machine at that moment, not the file


def stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class ScanMemo:
    """(path, size, mtime, inode, pixel budget, reader) -> decode outcome."""

    def __init__(self, folder: Path, max_pixels: int, reader: str) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / "scan.sqlite"
        self.db = open_wal(path, "CREATE TABLE IF NOT EXISTS outcome(path BLOB PRIMARY KEY, size INTEGER, "
                                 "mtime INTEGER, ino INTEGER, budget TEXT, result TEXT)", synchronous="FULL")
        self.budget = f"{reader}:{int(max_pixels)}"

    def known(self, path: str, key: tuple[int, int, int] | None) -> dict | None:
        if key is None:
            return None
        row = self.db.execute("SELECT size, mtime, ino, budget, result FROM outcome WHERE path = ?",
                              (os.fsencode(os.path.abspath(path)),)).fetchone()
        if row and tuple(row[:3]) == key and row[3] == self.budget:
            return json.loads(row[4])
        return None

    def remember(self, rows: list[tuple[str, tuple[int, int, int] | None, dict]]) -> None:
        """Store the decode outcomes of this scan (files whose stat changed during it are left out)."""
        keep = []
        for path, before, result in rows:
            if before is None or result.get("reason") in NOT_KEPT_REASONS or stat_key(path) != before:
                continue
            kept = {k: result[k] for k in KEPT if k in result}
            text = json.dumps(kept, separators=(",", ":"))
            keep.append((os.fsencode(os.path.abspath(path)), *before, self.budget, text))
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR REPLACE INTO outcome VALUES (?, ?, ?, ?, ?, ?)", keep)
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
