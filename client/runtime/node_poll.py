"""The site's SuperNode process (Flower's `flower-supernode`) with a short idle poll.

flwr 1.41's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps a fixed 3 s whenever a pull from the
SuperLink brings no message, and no option changes it. Right after a site pushes its reply the next round's message
is not there yet, so every round waited up to 3 s more at every site before it was even received. The runtime
(client/runtime/site_runtime.py) owns this process and starts it through here: the same Flower entry point, with
that loop's idle sleeps capped at IDLE_POLL_SECONDS while the site is in a run (it worked on a message in the last
FAST_POLL_WINDOW_SECONDS), and Flower's own 3 s otherwise: a fast pull costs the coordinator a request each time
(20 idle sites at 0.5 s: 40 requests/s, 0.31 of a core at the SuperLink; at 3 s: 0.08), so a site that has no run
does not pay it (PollClock; the rates: client/runtime/poll_timing.py). While a site's
ClientApp runs, the same loop checks its own local state for the reply every 0.5 s (no network call): those waits
are capped at REPLY_POLL_SECONDS, so a reply leaves for the SuperLink <= 0.05 s after the worker hands it over
instead of up to 0.5 s (the round waits for its slowest site's reply). The module's `time` is replaced, not the
global one. Its object puller (`pull_objects`, which backs off 1, 2, 4 s when the message's arrays are not uploaded
yet) gets the runtime's loopback-sized backoff (client/runtime/poll_timing.py PULL_BACKOFF). A reply's object pushes to
the SuperLink are retried on a server error (`retry_transient`): at 20 sites Flower's SuperLink answered some concurrent
pushes with 500 "database is locked" (its SQLite state) and the SuperNode dropped that reply after one try, so the
round waited its whole round-timeout for the site. The cause is fixed where it happens, in the SuperLink fedrad starts
(deploy/superlink_entry.py: a longer lock wait); the retry stays for a coordinator started otherwise, and only for
object pushes, which are content-addressed (a retried message push could store a reply twice). Nothing else in
Flower changes.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from fedrad.client.runtime.poll_timing import (
    FAST_POLL_WINDOW_SECONDS,
    IDLE_POLL_SECONDS,
    LOCAL_WAIT_SECONDS,
    PULL_BACKOFF,
    REPLY_POLL_SECONDS,
    in_run,
)
from fedrad.common.flower_patch import flower_is_patched_release, run_flower_entry

PUSH_TRIES = 6  # a reply's push: first try + 5 retries, 0.2 s doubling up to 2 s between them (~6 s in all)


def capped_sleep(seconds: float, cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS) -> float:
    """How long the patched loop sleeps for Flower's `seconds`: its local waits (<= LOCAL_WAIT_SECONDS) at
    most `local_cap`, its idle poll (the 3 s between empty pulls from the SuperLink) at most `cap`."""
    seconds = float(seconds)
    return min(seconds, local_cap if seconds <= LOCAL_WAIT_SECONDS else cap)


class PollClock:
    """How long the patched loop sleeps: `capped_sleep` while the site is in a run (a local wait, i.e. a message
    being worked on, within the last `window` seconds), Flower's own idle interval once it has been idle longer."""

    def __init__(self, cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS,
                 window: float = FAST_POLL_WINDOW_SECONDS, now=time.monotonic) -> None:
        self.cap, self.local_cap, self.window, self.now = cap, local_cap, window, now
        self.last_work = float("-inf")

    def seconds(self, flower_seconds: float) -> float:
        flower_seconds = float(flower_seconds)
        if flower_seconds <= LOCAL_WAIT_SECONDS:  # waiting for a ClientApp's reply or objects: in a run
            self.last_work = self.now()
        elif not in_run(self.last_work, self.now(), self.window):
            return flower_seconds  # no run lately: Flower's idle interval, no extra requests at the SuperLink
        return capped_sleep(flower_seconds, self.cap, self.local_cap)


def capped_time(cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS,
                window: float = FAST_POLL_WINDOW_SECONDS) -> SimpleNamespace:
    """A stand-in for the `time` module whose sleep is PollClock's."""
    clock = PollClock(cap, local_cap, window)
    names = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    return SimpleNamespace(**{**names, "sleep": lambda s: time.sleep(clock.seconds(s))})


def _transient(exc: BaseException) -> bool:
    """A server-side failure worth another try (HTTP 5xx, a dropped connection); a refusal (4xx) is not."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def retry_transient(fn, tries: int = PUSH_TRIES, first_wait: float = 0.2, max_wait: float = 2.0):
    """`fn` called again after a transient failure (see _transient), at most `tries` times in all; the last
    failure, or any other error, is raised as it was. For the SuperNode's object pushes: objects are
    content-addressed, so pushing one twice stores it once."""
    import functools
    import logging

    @functools.wraps(fn)
    def call(*args, **kwargs):
        wait = first_wait
        for attempt in range(1, tries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == tries or not _transient(exc):
                    raise
                logging.getLogger("fedrad.node").warning("push to the SuperLink failed (%s); try %d of %d in %.1f s",
                                                         exc, attempt + 1, tries, wait)
                time.sleep(wait)
                wait = min(max_wait, wait * 2)

    return call


def patch_supernode_loop(cap: float = IDLE_POLL_SECONDS, local_cap: float = REPLY_POLL_SECONDS) -> bool:
    """Cap the SuperNode loop's sleeps; False (nothing changed) on a Flower other than the one it was read in."""
    if not flower_is_patched_release():
        return False
    import functools

    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    loop.time = capped_time(cap, local_cap)
    push_messages = loop._push_messages
    # Only the object pushes: they are content-addressed, so a retry cannot duplicate anything. The message push is
    # left as Flower does it (one try): a retried push-messages seen at 20 sites may have stored a second reply.
    loop._push_messages = lambda state, object_store, send, push_object: push_messages(
        state=state, object_store=object_store, send=send, push_object=retry_transient(push_object))
    loop.pull_objects = functools.partial(pull_objects, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1])
    return True


def main() -> int:
    from flwr.supernode.cli import flower_supernode

    patch_supernode_loop()
    return run_flower_entry("flower-supernode", flower_supernode)


if __name__ == "__main__":
    sys.exit(main())
