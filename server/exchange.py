"""Send one batch of messages to the sites and collect the replies, timing each part.

Flower's `Grid.send_and_receive` sleeps 3 s between pulls (flwr 1.41, superlink/grid/http_grid.py), so a
reply that lands just after a pull is seen up to 3 s late, every message, every round. Here the same
push-then-pull runs through the Grid's own `push_messages` / `pull_messages` with a short interval, under
the same round timeout; with no message nothing is pushed or pulled at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL_SECONDS = 0.2  # a pull is one loopback/HTTPS round trip; 5 per second is next to nothing


@dataclass
class RoundTimes:
    """Where one round's wall time went (seconds); see fedrad.server.rounds for the metrics.jsonl names."""

    send: float = 0.0  # configure (sampling, building messages) + push to the SuperLink
    wait: float = 0.0  # from the end of the push until the last reply (the slowest site) or the timeout
    aggregate: float = 0.0  # screening + aggregation of replies
    site_compute_max: float = 0.0  # the slowest site's own train handler seconds
    train: float = 0.0  # the whole training half (SecAgg+ runs it in Flower's workflow, not split further)
    checkpoint: float = 0.0  # plot + checkpoint (the metrics line itself is appended after it is measured)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, times: RoundTimes,
             interval: float = REPLY_POLL_SECONDS) -> list[Message]:
    """Push `messages`, then pull replies every `interval` s until all are in or `timeout` passes."""
    msgs = list(messages)
    if not msgs:
        return []
    t0 = time.perf_counter()
    pending = {mid for mid in grid.push_messages(msgs) if mid}  # a message Flower could not push reads None
    del msgs
    t1 = time.perf_counter()
    times.send += t1 - t0
    replies: list[Message] = []
    end = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
    times.wait += time.perf_counter() - t1
    return replies
