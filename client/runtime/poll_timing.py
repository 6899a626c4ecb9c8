"""How often a site's processes look for work, in one place: fast while the site is in a run, slow otherwise.

A site polls twice: its SuperNode pulls the coordinator for messages (node_poll.py) and its runtime asks the
SuperNode for tasks (site_runtime.py). Fast polls keep a round's fixed overhead low, but each one is a request:
20 idle sites at these fast rates took 0.8 of a core between runs on a 2-core box (runtime + SuperNode) and 0.3
of a core at the coordinator (benchmarks/notes/many_sites.md). So both are fast only while the site is in a run,
i.e. it worked on a message in the last FAST_POLL_WINDOW_SECONDS, and slow otherwise (the first message of a run
waits at most Flower's 3 s, then every later one is seen at the fast rate).
"""

from __future__ import annotations

FAST_POLL_WINDOW_SECONDS = 30.0  # after the site's last work on a message, poll fast this long
IDLE_POLL_SECONDS = 0.5  # SuperNode -> SuperLink pull in a run (Flower sleeps 3 s, which stays the idle rate)
REPLY_POLL_SECONDS = 0.05  # SuperNode's local check for the worker's reply (no RPC): 20/s while a ClientApp works
LOCAL_WAIT_SECONDS = 0.5  # Flower's SuperNode sleeps of at most this long are its local reply/object waits
ACQUIRE_POLL_SECONDS = 0.1  # runtime -> SuperNode AcquireTask in a run (one loopback HTTP call)
ACQUIRE_IDLE_SECONDS = 1.0  # the same with no run lately
# The SuperNode hands out a message's token before it has pulled the message's arrays from the SuperLink;
# Flower's puller backs off 1, 2, 4, 8 s on an object not there yet (15 s seen per round on a busy box). Here
# the objects come from the SuperNode on loopback, so look again soon: 0.05 s, doubling up to 0.5 s.
PULL_BACKOFF = (0.05, 0.5)


def in_run(last_work: float, now: float, window: float = FAST_POLL_WINDOW_SECONDS) -> bool:
    """Did the site work on a message within `window` seconds before `now` (same clock as `last_work`)?"""
    return now - last_work <= window
