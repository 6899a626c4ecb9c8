"""The exceptions fedrad's commands raise; the CLI shell (fedrad.deploy.cli) turns each into one line on stderr
and its exit code, the Python API (`import fedrad`) lets them through.

    FedradError     base: `exit_code` is what the `fedrad` command exits with
    BadInput        a missing file, a bad value (exit 2); also a ValueError, as bad input always was
    Refused         the command did its checks and said no, or what it started did not finish (exit 1)
    BundleRefused   a release bundle failed verification or the site's rollback policy (exit 1)
    check_exit      a long-running command's exit status (a node, a run, a dashboard) as one of these
"""

from __future__ import annotations

import sys


class FedradError(RuntimeError):
    """A fedrad command failed. `exit_code` is the CLI's: 2 bad input, 1 refused or failed."""

    exit_code = 1

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInput(FedradError, ValueError):
    """A missing file or a bad value; the message names it (exit 2)."""

    exit_code = 2


class Refused(FedradError):
    """Checked and refused, or failed (a run that did not finish, an existing key); exit 1 unless it says.

    An empty message means the reason was already reported (e.g. the log of the process that failed)."""


class BundleRefused(Refused):
    """A bundle that must not be used: its signature, hashes or the site's rollback policy failed."""


def check_exit(code: int | None) -> None:
    """A process-driving command's exit status (a node, a run, a log that followed a run) as an exception: 0 (or
    None) is success; anything else is Refused with that code, so the shell exits with it as before (the reason
    was already printed by what ran)."""
    if code:
        raise Refused("", exit_code=int(code))
    sys.stdout.flush()


__all__ = ["BadInput", "BundleRefused", "FedradError", "Refused", "check_exit"]
