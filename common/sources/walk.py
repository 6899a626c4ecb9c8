"""Walking a site folder without ever failing on it: odd names, unreadable folders, symlink loops, FIFOs.

Every file is either listed or reported with a reason; nothing vanishes. Names are kept as the OS gives
them (non-UTF-8 bytes as surrogate escapes, so the file can still be opened) and turned printable only for
display by `display_name`.
"""

from __future__ import annotations

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
    paths: list[str] = field(default_factory=list)  # regular files, sorted (strings: 10^6 Path objects cost)
    problems: list[Problem] = field(default_factory=list)  # files that cannot be opened as files
    folders: list[Problem] = field(default_factory=list)  # folders not walked (unreadable, symlinked)
    # (absolute folder, st_mtime_ns, st_ino) of each folder walked, stat taken before it was listed; and the
    # folders whose files `known` said were unchanged (their files are not listed)
    dirs: list[tuple[str, int, int]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p in self.paths]


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
    A plain file costs no stat (scandir's entry type); only links and odd entries are stat'ed.
    """
    base = os.path.abspath(root)
    result = Walk()
    cut = len(os.path.join(base, ""))

    def rel(p: str) -> str:
        return p[cut:] if p.startswith(base) and len(p) > cut else os.path.relpath(p, base)

    def note(folder: str) -> tuple[int, int] | None:  # stat before listing: a file added after it changes mtime
        try:
            st = os.stat(folder)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    stack: list[tuple[str, tuple[int, int] | None]] = [(base, note(base))]
    while stack:
        here, seen = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            where = exc.filename if exc.filename is not None else here
            result.folders.append(Problem(rel(os.fspath(where)), "unreadable",
                                          f"cannot list folder: {exc.strerror or exc}"))
            continue
        skip_files = False
        if seen is not None:
            result.dirs.append((here, *seen))
            if known is not None and known(here, *seen):
                result.unchanged.append(here)
                skip_files = True
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                    continue
                plain = not e.is_symlink() and e.is_file(follow_symlinks=False)
            except OSError:
                plain = False
            if skip_files and not e.is_symlink():
                continue
            if plain:
                if not skip_files:
                    result.paths.append(e.path)
                continue
            _odd(e.path, rel(e.path), result, subdirs, skip_files)
        for d in reversed(subdirs):  # depth first, in name order
            stack.append((d, note(d)))
    return result


def _odd(full: str, name: str, result: Walk, subdirs: list[str], skip_files: bool) -> None:
    """A link or a non-regular entry: listed if it is a regular file, else reported (never followed as a folder)."""
    try:
        st = os.stat(full)
    except OSError as exc:
        if not skip_files:
            why = "symbolic link loop" if exc.errno == errno.ELOOP else \
                "dangling symbolic link" if os.path.islink(full) else exc.strerror or str(exc)
            result.problems.append(Problem(name, "unreadable", why))
        return
    if stat.S_ISDIR(st.st_mode):
        if os.path.islink(full):
            result.folders.append(Problem(name, "unreadable", "symbolic link to a folder: not followed"))
        else:
            subdirs.append(full)
    elif skip_files:
        return
    elif not stat.S_ISREG(st.st_mode):
        result.problems.append(Problem(name, "unreadable", "not a regular file (device, FIFO or socket)"))
    else:
        result.paths.append(full)
