"""Walking a site folder without ever failing on it: odd names, unreadable folders, symlink loops, FIFOs.

Every file is either listed or reported with a reason; nothing vanishes. Names are kept as the OS gives
them (non-UTF-8 bytes as surrogate escapes, so the file can still be opened) and turned printable only for
display by `display_name`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """A file or folder that was found but cannot be read as an item (`reason` from errors.REASONS)."""

    path: str  # relative to the walked root, raw (may hold surrogate escapes)
    reason: str
    detail: str


@dataclass
class Walk:
    files: list[Path] = field(default_factory=list)  # regular files, sorted
    problems: list[Problem] = field(default_factory=list)  # files that cannot be opened as files
    folders: list[Problem] = field(default_factory=list)  # folders not walked (unreadable, symlinked)
    # (absolute folder, st_mtime_ns, st_ino) of each folder walked, stat taken before it was listed; and the
    # folders whose files `known` said were unchanged (their files are not listed)
    dirs: list[tuple[str, int, int]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


DirCheck = Callable[[str, int, int], bool]  # (absolute folder, st_mtime_ns, st_ino) -> its files are known


def display_name(name: str) -> str:
    """A name safe to print or store: undecodable bytes as \\xNN, control/format characters escaped.

    Newlines, terminal escape codes (ESC), bidi overrides and zero-width characters can make a listing lie
    about what is on disk; they are shown as escapes instead.
    """
    out = []
    for ch in name:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape of a non-UTF-8 byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def walk_folder(root: str | os.PathLike[str], known: DirCheck | None = None) -> Walk:
    """Every regular file under `root`, sorted, skipping hidden files and folders (.fedrad-cache, .git).

    Symlinked folders are not followed (a loop or a link out of the archive would otherwise be walked);
    they, unreadable folders, dangling or looping file links and non-regular files are reported.
    `known(folder, mtime_ns, inode)` (the quick ingest pass, issue 26): True says the folder is as it was when
    its files were all stored, so its files are neither stat'ed nor listed (its subfolders still are: a
    folder's mtime changes when an entry is added, removed or renamed in it, not below it).
    """
    base = Path(root)
    result = Walk()
    stats: dict[str, tuple[int, int]] = {}

    def note(folder: str) -> None:  # stat before os.walk lists it: a file added after this changes its mtime
        with contextlib.suppress(OSError):
            st = os.stat(folder)
            stats[os.path.abspath(folder)] = (st.st_mtime_ns, st.st_ino)

    note(str(base))

    def rel(p: str | Path) -> str:
        return os.path.relpath(p, base)

    def on_error(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else base
        result.folders.append(Problem(rel(where), "unreadable", f"cannot list folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(base, onerror=on_error):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                result.folders.append(Problem(rel(full), "unreadable", "symbolic link to a folder: not followed"))
            else:
                keep.append(d)
                note(full)
        dirnames[:] = keep
        here = os.path.abspath(dirpath)
        seen = stats.get(here)
        if seen is not None:
            result.dirs.append((here, *seen))
            if known is not None and known(here, *seen):
                result.unchanged.append(here)
                continue
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError as exc:
                why = "symbolic link loop" if exc.errno == errno.ELOOP else \
                    "dangling symbolic link" if os.path.islink(full) else exc.strerror or str(exc)
                result.problems.append(Problem(rel(full), "unreadable", why))
                continue
            if stat.S_ISDIR(st.st_mode):  # a link to a folder listed as a file by os.walk
                result.folders.append(Problem(rel(full), "unreadable", "symbolic link to a folder: not followed"))
            elif not stat.S_ISREG(st.st_mode):
                result.problems.append(Problem(rel(full), "unreadable", "not a regular file (device, FIFO or socket)"))
            else:
                result.files.append(Path(full))
    return result
