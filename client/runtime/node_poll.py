"""The site's SuperNode process (Flower's `flower-supernode`) with a short idle poll.

flwr 1.41's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps a fixed 3 s whenever a pull from the
SuperLink brings no message, and no option changes it. Right after a site pushes its reply the next round's message
is not there yet, so every round waited up to 3 s more at every site before it was even received. The runtime
(client/runtime/site_runtime.py) owns this process and starts it through here: the same Flower entry point, with
that loop's sleeps capped at IDLE_POLL_SECONDS (one small PullMessages call per site per interval). While a site's
ClientApp runs, the same loop checks its own local state for the reply every 0.5 s (no network call): those waits
are capped at REPLY_POLL_SECONDS, so a reply leaves for the SuperLink <= 0.05 s after the worker hands it over
instead of up to 0.5 s (the round waits for its slowest site's reply). The module's `time` is replaced, not the
global one. Its object puller (`pull_objects`, which backs off 1, 2, 4 s when the message's arrays are not uploaded
yet) gets the runtime's loopback-sized backoff (client/runtime/site_runtime.py PULL_BACKOFF). Nothing else in Flower
changes.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

IDLE_POLL_SECONDS = 0.5  # ~2 pulls/s per site: the wait after aggregation drops from ~3 s to <= 0.5 s
REPLY_POLL_SECONDS = 0.05  # a local state lookup, not an RPC: 20/s per site while its ClientApp works
LOCAL_WAIT_SECONDS = 0.5  # Flower's sleeps of at most this long are its local reply/object waits
FLWR_VERSION = "1.41.0"  # the loop patched here; another version runs unpatched (its own timing)


def capped_sleep(seconds: float, cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS) -> float:
    """How long the patched loop sleeps for Flower's `seconds`: its local waits (<= LOCAL_WAIT_SECONDS) at
    most `local_cap`, its idle poll (the 3 s between empty pulls from the SuperLink) at most `cap`."""
    seconds = float(seconds)
    return min(seconds, local_cap if seconds <= LOCAL_WAIT_SECONDS else cap)


def capped_time(cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS) -> SimpleNamespace:
    """A stand-in for the `time` module whose sleep is `capped_sleep`."""
    names = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    return SimpleNamespace(**{**names, "sleep": lambda s: time.sleep(capped_sleep(s, cap, local_cap))})


def patch_supernode_loop(cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS) -> bool:
    """Cap the SuperNode loop's sleeps; False (nothing changed) on a Flower other than FLWR_VERSION."""
    from importlib.metadata import version

    if version("flwr") != FLWR_VERSION:
        return False
    import functools

    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    from fedrad.client.runtime.site_runtime import PULL_BACKOFF

    loop.time = capped_time(cap, local_cap)
    loop.pull_objects = functools.partial(pull_objects, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1])
    return True


def main() -> int:
    from flwr.supernode.cli import flower_supernode

    patch_supernode_loop()
    sys.argv[0] = "flower-supernode"
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
