"""The site's own lines reach the node's output, once each, in plain text when it is not a terminal."""

from __future__ import annotations

import subprocess
import sys

SNIPPET = """
import logging, sys
from fedrad.client.runtime.site_runtime import configure_logging
configure_logging(sys.argv[1])
logging.getLogger("fedrad.client").info("round 1 train (simclr): 10 steps")
from flwr.common.logger import log
log(logging.WARNING, "a flower warning")
"""


def _run(level: str) -> str:
    out = subprocess.run([sys.executable, "-c", SNIPPET, level], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_site_progress_reaches_a_log_file_once_without_colour():
    err = _run("INFO")
    assert err.count("round 1 train (simclr): 10 steps") == 1
    assert err.count("a flower warning") == 1
    assert "\x1b[" not in err


def test_log_level_warning_hides_progress():
    err = _run("WARNING")
    assert "round 1 train" not in err and "a flower warning" in err


def test_node_command_passes_the_log_level_to_the_runtime():
    from fedrad.deploy.processes import supernode_command

    cmd = supernode_command("127.0.0.1:8000", 9094, {"data-dir": "/x"}, log_level="DEBUG")
    i = cmd.index("--log-level")
    assert cmd[i + 1] == "DEBUG" and i < cmd.index("--")
