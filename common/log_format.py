"""One log line format for fedrad and Flower: ISO 8601 UTC time, level, logger, message; JSON lines on request.

A pretraining run lasts days across hospitals, so every line says when it happened (UTC, milliseconds) in the
coordinator's and the sites' logs alike. `FEDRAD_LOG_FORMAT=json` (or `fedrad --log-format json`, which sets
it for every process fedrad starts) gives one JSON object per line for a log collector. Flower's own
records keep going through Flower's console handler (the ServerApp mirrors it to `flwr log`); only its
format is replaced. Imports stay light: the Flower processes import this early.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime

LOG_FORMAT_ENV = "FEDRAD_LOG_FORMAT"
LOG_FORMATS = ("text", "json")


def iso_utc(seconds: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds: 2026-12-06T07:04:46.123Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class IsoFormatter(logging.Formatter):
    """`2026-12-06T07:04:46.123Z INFO fedrad.client: message` (no colour codes: logs are files)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_utc(record.created)


class JsonFormatter(IsoFormatter):
    """One JSON object per line: time, level, logger, message (and the exception's text, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": iso_utc(record.created), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_FLOWER_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")


class FlowerLines:
    """Another process's Flower lines (`INFO :      text`, colour codes already stripped) in this format.

    The SuperNode is Flower's own executable and prints in Flower's format; the node runtime copies its output
    through this, so the site's log has one format. A line without a level (a traceback's) keeps the level of
    the line before it."""

    def __init__(self, logger: str = "flwr", choice: str | None = None) -> None:
        self.logger, self.formatter, self.level = logger, formatter(choice), logging.INFO

    def line(self, text: str) -> str:
        text = text.rstrip("\n")
        match = _FLOWER_LINE.match(text)
        if match:
            self.level = logging.getLevelName(match.group(1))
            text = match.group(2)
        record = logging.LogRecord(self.logger, self.level, "", 0, text, None, None)
        return self.formatter.format(record) + "\n"


def log_format(choice: str | None = None) -> str:
    """`choice`, else $FEDRAD_LOG_FORMAT, else "text"; ValueError names a value that is neither."""
    value = (choice or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV}={value!r}: the log format is 'text' or 'json'")
    return value


def formatter(choice: str | None = None) -> logging.Formatter:
    return JsonFormatter() if log_format(choice) == "json" else IsoFormatter()


def configure(level: str | int | None = "INFO", choice: str | None = None) -> None:
    """Root logger (fedrad's own loggers) and Flower's console handler both write in the one format.

    Flower's logger does not propagate (it prints its records itself: once is enough); its console handler
    is kept, because Flower redirects its stream (ServerApp logs to `flwr log`), and formats like ours.
    `level` None keeps the levels as they are (Flower's FLWR_LOG_LEVEL)."""
    fmt = formatter(choice)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    logging.basicConfig(level=level or logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    flower = logging.getLogger("flwr")
    flower.propagate = False
    for flower_handler in flower.handlers:
        if isinstance(flower_handler, logging.StreamHandler) and not isinstance(flower_handler, logging.FileHandler):
            if level is not None:
                flower_handler.setLevel(level)
            flower_handler.format = fmt.format  # type: ignore[method-assign]  # ConsoleHandler overrides format()


__all__ = ["LOG_FORMATS", "LOG_FORMAT_ENV", "FlowerLines", "IsoFormatter", "JsonFormatter", "configure", "formatter",
           "iso_utc", "log_format"]
