"""Where a key sits in a TOML file, so that every config error names the file and line (one helper for the
run-config files of `fedrad run -c`, the node's `--config node.toml` and the site policy).

tomllib gives values, not positions; a key's line is found by reading the text the values came from.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\[\s*([A-Za-z0-9_.\"-]+)\s*\]")


def key_line(text: str, key: str | None, table: str | None = None) -> int:
    """1-based line where `key` is set in `[table]` (None: at the top level, or a table named `key`), or of the
    `[table]` header when `key` is None; 0 when it is not in the text (a default value)."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = _HEADER.match(stripped)
        if header:
            current = header.group(1).strip('"')
            if (key is None and current == table) or (table is None and current == key):
                return number
            continue
        if key is not None and current == table and "=" in stripped:
            if stripped.split("=", 1)[0].strip().strip('"') == key:
                return number
    return 0


def at(source: str, text: str, key: str | None, table: str | None = None) -> str:
    """`source:line` where the key is set, else `source` alone: the prefix of a config error."""
    line = key_line(text, key, table) if text else 0
    return f"{source}:{line}" if line else source
