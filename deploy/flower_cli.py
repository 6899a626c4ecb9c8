"""Talking to the coordinator through Flower's own `flwr` CLI, for `fedrad run`, `runs`, `stop`, `certs` and the
dashboard: a private FLWR_HOME naming the coordinator, `flwr ... --format json` replies, flwr's error panels
folded into one line, the consortium CA from a certs folder. Below all of them, so none imports another for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedrad.deploy.processes import flower_env, tool

RUN_FAILED_EXIT = 1  # the coordinator says the run ended "finished:failed" or "finished:stopped"


def write_flwr_home(home: Path, address: str, ca_cert: Path | None = None) -> Path:
    """A private FLWR_HOME whose config.toml names the coordinator's Control API as connection 'fedrad'."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fedrad"', "", "[superlink.fedrad]", f"address = {json.dumps(address)}"]
    if ca_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(ca_cert))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


class CoordinatorError(Exception):
    """Flower could not do what was asked at the coordinator; the message is Flower's own reason."""


def flwr_json(command: list[str], superlink: str, ca_cert: Path | None = None, timeout: float = 120.0
              ) -> dict[str, Any]:
    """`flwr COMMAND fedrad --format json` against `superlink`; its JSON reply, or CoordinatorError with the
    last paragraph of Flower's error message (the reason, without its "Using SuperLink ..." preamble)."""
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca_cert)
    try:
        out = subprocess.run([tool("flwr"), *command, "fedrad", "--format", "json"], capture_output=True,
                             text=True, env=flower_env({"FLWR_HOME": str(home)}), timeout=timeout,
                             start_new_session=True)
    except subprocess.TimeoutExpired:
        raise CoordinatorError(f"no answer from {superlink} in {timeout:.0f} s") from None
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = out.stdout
    try:
        reply = json.loads(text[text.index("{"):])
    except ValueError:
        last = (out.stderr or out.stdout).strip().splitlines()
        raise CoordinatorError(last[-1] if last else f"flwr exited with {out.returncode}") from None
    if not reply.get("success"):
        message = str(reply.get("error-message") or "unknown error")
        raise CoordinatorError(" ".join(message.strip().split("\n\n")[-1].split()))
    return reply


_BOX_EDGES = "╭│╰"


class FlowerBox:
    """Folds one of `flwr`'s rich panels (its errors: ╭─ Error ─╮ │ text │ ╰─╯) into one line.

    `feed(line)` says whether the line belonged to a panel; after the closing edge, `message` holds the
    panel's title and text joined by spaces ("" until then).
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._open = False
        self.message = ""

    def feed(self, line: str) -> bool:
        text = line.strip()
        self.message = ""
        if not text or text[0] not in _BOX_EDGES:
            return False
        inner = text.strip("╭╮╰╯│─ ")
        if text[0] == "╭":
            self._parts, self._open = ([inner] if inner else []), True
        elif text[0] == "│" and self._open:
            if inner:
                self._parts.append(inner)
        elif text[0] == "╰":
            title, *body = self._parts or [""]
            joined = " ".join(body)
            self.message = f"{title}: {joined}" if title and body else (title or joined)
            self._parts, self._open = [], False
        return True


def ca_from(certs: str | os.PathLike[str] | None) -> Path | None:
    """The consortium CA that `fedrad run` trusts: `ca.pem` in the --certs folder (no private key needed)."""
    if not certs:
        return None
    ca = Path(certs).resolve() / "ca.pem"
    if not ca.exists():
        raise FileNotFoundError(f"--certs: {ca} does not exist (the consortium CA from `fedrad certs init`)")
    return ca
