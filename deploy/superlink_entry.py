"""`python -m fedrad.deploy.superlink_entry ...`: Flower's `flower-superlink`, with a longer SQLite lock wait.

flwr 1.41's SuperLink keeps its state in SQLite with `busy_timeout = 5000` (flwr/supercore/constant.py). With 20
sites pulling and pushing at once on a busy coordinator (round 1: every site's worker starting), a request can wait
more than 5 s for the write lock; the SuperLink then answers 500 "database is locked", and for a reply's
push-messages the SuperNode drops that reply after its one try, so the round waits its whole round-timeout for a
site that had finished (seen at 20 sites, benchmarks/notes/many_sites.md). Retrying that push at the site is not
safe in general (a push that failed after its message was stored would store a reply whose objects never come), so
the lock wait is raised where it happens: a request waits up to BUSY_TIMEOUT_MS for the lock instead of failing.
Everything else is Flower's own entry point and arguments.
"""

from __future__ import annotations

import sys

from fedrad.common.flower_patch import flower_is_patched_release, run_flower_entry

# a request waits this long for SQLite's write lock before the SuperLink answers 500; below the 30 s the SuperNode's
# HTTP client waits for an answer (flwr/supercore/protobuf/client.py), so a slow answer is not a client timeout
BUSY_TIMEOUT_MS = 20_000


def patch_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> bool:
    """Set the SuperLink's SQLite busy_timeout to `ms`; False (nothing changed) on a Flower other than the one it was
    read in (fedrad.common.flower_patch)."""
    if not flower_is_patched_release():
        return False
    import flwr.supercore.constant as constant
    import flwr.supercore.sql_mixin as sql_mixin  # it copied the pragmas at import: patch both

    pragmas = tuple((k, str(ms) if k == "busy_timeout" else v) for k, v in constant.SQLITE_PRAGMAS)
    constant.SQLITE_PRAGMAS = sql_mixin.SQLITE_PRAGMAS = pragmas
    return True


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    patch_busy_timeout()
    return run_flower_entry("flower-superlink", flower_superlink)


if __name__ == "__main__":
    sys.exit(main())
