"""fedrad's SuperNode: Flower 1.41's own `flower-supernode`, with its waits shortened.

Flower's SuperNode sleeps a fixed 3 s between polls when idle, polls every 0.5 s for the reply it is waiting to
send, and pulls a message's objects (one per array) with a 1-10 s retry backoff: at one array object each, a
model's ~100 objects that are not yet on the SuperLink cost seconds per message. None of this is configurable
in 1.41, so this entry point runs Flower's own `flower_supernode()` after replacing two names in
`flwr.supernode.start_client_internal` (the pinned version's module; a test fails loudly if they move):

- `time`, with a `sleep` that waits IDLE_POLL_SECONDS instead of 3 s and REPLY_POLL_SECONDS instead of 0.5 s;
- `pull_objects`, with a 0.05-0.5 s retry backoff instead of 1-10 s.

Everything else (TLS, node auth, process isolation, the Runtime API) is Flower's code, unchanged.
"""

from __future__ import annotations

import functools
import sys
import time
import types

IDLE_POLL_SECONDS = 0.5  # Flower: 3 s between polls of the SuperLink when no message is waiting
REPLY_POLL_SECONDS = 0.05  # Flower: 0.5 s between looks for the ClientApp's reply (and its objects)
PULL_BACKOFF = (0.05, 0.5)  # Flower: 1 s first retry, doubling to 10 s, for an object not yet on the SuperLink
_FLOWER_WAITS = {3: IDLE_POLL_SECONDS, 0.5: REPLY_POLL_SECONDS}


def _short_sleep(seconds: float) -> None:
    time.sleep(_FLOWER_WAITS.get(seconds, seconds))


def shorten_waits() -> None:
    """Replace the SuperNode loop's `time` and `pull_objects` (AttributeError if Flower renamed them)."""
    from flwr.supernode import start_client_internal as loop

    if not isinstance(loop.time, types.SimpleNamespace):
        loop.time = types.SimpleNamespace(sleep=_short_sleep, time=time.time, monotonic=time.monotonic)
    if not isinstance(loop.pull_objects, functools.partial):
        loop.pull_objects = functools.partial(loop.pull_objects, initial_backoff=PULL_BACKOFF[0],
                                              backoff_cap=PULL_BACKOFF[1])


def main() -> None:
    import os

    from flwr.supernode.cli import flower_supernode

    if os.environ.get("FEDRAD_SUPERNODE_WAITS") != "flower":  # "flower": Flower's own waits (benchmark baseline)
        shorten_waits()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
