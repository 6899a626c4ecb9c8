"""Process logs stay bounded however long a process writes (common/log_rotation.py), and keep the last lines."""

from __future__ import annotations

import logging
import sys

import pytest

from fedrad.common.log_rotation import RotatingLog, log_limits, log_parts, rotating_handler
from fedrad.deploy.processes import ProcessGroup


def test_log_stays_bounded_and_keeps_the_last_lines(tmp_path):
    path = tmp_path / "node.log"
    with RotatingLog(path, max_bytes=2048, keep=3) as log:
        for i in range(5000):
            log.write(f"line {i:05d} of a long run\n")
    parts = log_parts(path)
    assert [p.name for p in parts] == ["node.log", "node.log.1", "node.log.2"]
    assert sum(p.stat().st_size for p in parts) <= 3 * 2048
    assert all(p.stat().st_size <= 2048 for p in parts)
    text = "".join(p.read_text() for p in reversed(parts))
    lines = text.splitlines()
    assert lines[-1] == "line 04999 of a long run"  # the newest line is kept, in the current file
    assert path.read_text().splitlines()[-1] == lines[-1]
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 5000))  # contiguous: no line lost or split between the kept files


def test_keep_one_and_reopen_appends(tmp_path):
    path = tmp_path / "a.log"
    with RotatingLog(path, max_bytes=1024, keep=1) as log:
        for i in range(200):
            log.write(f"{i:04d} " + "x" * 40 + "\n")
    assert log_parts(path) == [path] and path.stat().st_size <= 1024
    size = path.stat().st_size
    with RotatingLog(path, max_bytes=1024, keep=1) as log:  # a restarted process appends to the same log
        log.write("after restart\n")
    assert path.read_text().endswith("after restart\n")
    assert path.stat().st_size in (size + 14, 14)


def test_limits_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRAD_LOG_MAX_BYTES", "4096")
    monkeypatch.setenv("FEDRAD_LOG_KEEP", "2")
    assert log_limits() == (4096, 2)
    handler = rotating_handler(tmp_path / "py.log")
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 4096 and handler.backupCount == 1
    handler.close()
    monkeypatch.setenv("FEDRAD_LOG_KEEP", "zero")
    with pytest.raises(ValueError, match="FEDRAD_LOG_KEEP"):
        log_limits()
    monkeypatch.setenv("FEDRAD_LOG_KEEP", "2")
    monkeypatch.setenv("FEDRAD_LOG_MAX_BYTES", "10")
    with pytest.raises(ValueError, match="FEDRAD_LOG_MAX_BYTES=10: must be at least 1024"):
        log_limits()


def test_a_process_log_of_the_process_group_rotates(monkeypatch, tmp_path):
    """A real process (as SuperLink / SuperNode are started) writing far more than the limit: bounded log."""
    monkeypatch.setenv("FEDRAD_LOG_MAX_BYTES", "8192")
    monkeypatch.setenv("FEDRAD_LOG_KEEP", "3")
    log = tmp_path / "logs" / "chatty.log"
    code = "import sys\nfor i in range(20000):\n    print(f'\\x1b[32mINFO\\x1b[0m line {i}')\n"
    with ProcessGroup() as group:
        proc = group.start("chatty", [sys.executable, "-c", code], log)
        proc.wait(timeout=120)
    parts = log_parts(log)
    assert len(parts) == 3
    assert sum(p.stat().st_size for p in parts) <= 3 * 8192
    last = log.read_text().splitlines()
    assert last[-1] == "INFO line 19999"  # colour codes stripped, the newest line kept
