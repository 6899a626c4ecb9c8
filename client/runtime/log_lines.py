"""The site runtime's log lines: its own and the SuperNode's output in the site's format (ISO time, level), without
the colour codes Flower writes whatever its output is. Used by the runtime and by deploy/ for the processes
it starts."""

from __future__ import annotations

import re

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def configure_logging(level: str = "INFO") -> None:
    """The site's own lines (fedrad.client's one line per message, the runtime's refusals) go to stderr, which
    is the node's terminal or log file; Flower's lines in the same format, without colour codes."""
    import flwr.common.logger  # noqa: F401  (Flower's console handler exists once its logger module is imported)

    from fedrad.common.log_format import configure

    configure(level)  # ISO times and levels, JSON lines with FEDRAD_LOG_FORMAT=json (fedrad.common.log_format)


def copy_formatted(stream, sink) -> None:
    """Copy the SuperNode's output line by line in the site's log format (fedrad.common.log_format)."""
    from fedrad.common.log_format import FlowerLines

    lines = FlowerLines("flwr.supernode")
    for line in stream:
        sink.write(lines.line(ANSI.sub("", line)))
        sink.flush()


def copy_plain(stream, sink) -> None:
    """Copy the SuperNode's output line by line without colour codes (it colours whatever it writes to)."""
    for line in stream:
        sink.write(ANSI.sub("", line))
        sink.flush()
