"""One log format for fedrad and Flower: ISO 8601 UTC times and levels, JSON lines on request, progress bars
only on a terminal."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from fedrad.common.log_format import IsoFormatter, JsonFormatter, log_format

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"

SNIPPET = """
import logging, sys
from fedrad.client.runtime.site_runtime import configure_logging
configure_logging("INFO")
logging.getLogger("fedrad.client").info("round 1 train: 10 steps")
from flwr.common.logger import log
log(logging.WARNING, "a flower warning")
"""


def _record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("fedrad.server", level, __file__, 1, msg, (), None)


def test_text_lines_carry_iso_time_and_level():
    line = IsoFormatter().format(_record("round 3 done"))
    assert re.fullmatch(ISO + r" INFO fedrad\.server: round 3 done", line), line


def test_json_lines_parse():
    entry = json.loads(JsonFormatter().format(_record("capped \"site-a\"", logging.WARNING)))
    assert entry["level"] == "WARNING" and entry["logger"] == "fedrad.server" and entry["message"] == 'capped "site-a"'
    assert re.fullmatch(ISO, entry["time"])


def test_unknown_format_is_refused(monkeypatch):
    monkeypatch.setenv("FEDRAD_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="FEDRAD_LOG_FORMAT='xml'"):
        log_format()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_fedrad_and_flower_lines_share_the_format(fmt):
    """A node's log: fedrad's own line and Flower's, each once, both with ISO time and level, no colour."""
    env = {**__import__("os").environ, "FEDRAD_LOG_FORMAT": fmt}
    out = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if "round 1 train" in x or "a flower warning" in x]
    assert len(lines) == 2 and "\x1b[" not in out.stderr, out.stderr
    if fmt == "json":
        entries = [json.loads(x) for x in lines]
        assert [e["level"] for e in entries] == ["INFO", "WARNING"]
        assert [e["logger"] for e in entries] == ["fedrad.client", "flwr"]
        assert all(re.fullmatch(ISO, e["time"]) for e in entries)
    else:
        assert re.match(ISO + " INFO fedrad.client: round 1 train", lines[0]), lines
        assert re.match(ISO + " WARNING flwr: a flower warning", lines[1]), lines


def test_cli_log_format_reaches_child_processes(monkeypatch, capsys):
    from fedrad.deploy.cli import main

    monkeypatch.delenv("FEDRAD_LOG_FORMAT", raising=False)
    assert main(["--log-format", "json"]) == 0
    import os

    assert os.environ.pop("FEDRAD_LOG_FORMAT") == "json"


def test_progress_bar_only_on_a_terminal(capsys):
    """A log file gets no progress bar (tqdm's carriage-return lines), even where progress is asked for."""
    from fedrad.common.sources.workers import map_isolated

    assert list(map_isolated(abs, [-1, -2, -3], lambda item, detail: None, workers=0, progress=True,
                             desc="decode")) == [1, 2, 3]
    captured = capsys.readouterr()
    assert "decode" not in captured.err and "\r" not in captured.err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_supernodes_flower_lines_are_rewritten_in_the_format(fmt):
    """The SuperNode prints Flower's own `INFO :      text`; the node runtime copies it in the site's format."""
    from fedrad.common.log_format import FlowerLines

    lines = FlowerLines("flwr.supernode", fmt)
    out = [lines.line(x) for x in ("INFO :      Starting Flower SuperNode\n", "ERROR :     boom\n",
                                    "Traceback (most recent call last):\n")]
    assert all(x.endswith("\n") and x.count("\n") == 1 for x in out)
    if fmt == "json":
        entries = [json.loads(x) for x in out]
        assert [(e["level"], e["message"]) for e in entries] == [
            ("INFO", "Starting Flower SuperNode"), ("ERROR", "boom"), ("ERROR", "Traceback (most recent call last):")]
        assert all(e["logger"] == "flwr.supernode" and re.fullmatch(ISO, e["time"]) for e in entries)
    else:
        assert re.fullmatch(ISO + r" INFO flwr\.supernode: Starting Flower SuperNode\n", out[0]), out
        assert re.fullmatch(ISO + r" ERROR flwr\.supernode: Traceback \(most recent call last\):\n", out[2]), out
