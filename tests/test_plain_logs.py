"""The coordinator's logs are plain text: Flower colours every line it prints, whatever it prints to, so
fedrad strips the colour codes wherever it writes a Flower process's output to a file or a redirect."""

from __future__ import annotations

import signal
import sys

from fedrad.deploy.processes import ProcessGroup, _run_foreground

COLOURED = [sys.executable, "-c", "print('\\x1b[92mINFO \\x1b[0m:      Starting Flower SuperLink'); "
            "import sys; print('\\x1b[91mERROR \\x1b[0m: boom', file=sys.stderr)"]


def test_process_group_log_files_hold_no_colour_codes(tmp_path):
    with ProcessGroup() as group:
        proc = group.start("coloured", COLOURED, tmp_path / "logs" / "superlink.log")
        assert proc.wait(timeout=60) == 0
    text = (tmp_path / "logs" / "superlink.log").read_text()
    assert text == "INFO :      Starting Flower SuperLink\nERROR : boom\n", repr(text)


def test_foreground_coordinator_redirected_is_plain(capfd):
    """`fedrad coordinator > file` (systemd, containers): stdout is not a terminal, so no colour codes."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert _run_foreground(COLOURED, {}) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = capfd.readouterr().out
    assert "\x1b[" not in out and "INFO :      Starting Flower SuperLink" in out and "ERROR : boom" in out
