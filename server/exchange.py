"""Send one batch of messages to the sites and collect the replies, timing each part.

Flower's `Grid.send_and_receive` sleeps 3 s between pulls (flwr 1.41, superlink/grid/http_grid.py), so a
reply that lands just after a pull is seen up to 3 s late, every message, every round. Here the same
push-then-pull runs through the Grid's own `push_messages` / `pull_messages` with a short interval, under
the same round timeout; with no message nothing is pushed or pulled at all.

A reply can be listed before all its arrays reached the SuperLink (the SuperNode pushes them one object
at a time); Flower's object puller then backs off 1, 2, 4, 8 s. `exchange` sets the Grid's puller to
REPLY_PULL_BACKOFF instead (flwr 1.41 `superlink.grid.http_grid.pull_objects`, the ServerApp process only).

Every message pushed here carries the model in fedrad's wire format (fedrad.common.packing: one array per
dtype instead of one per state-dict entry, so a message is a handful of Flower objects, not hundreds);
the replies' packed arrays are unpacked and checked against the global model by fedrad.server.screening.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedrad.common.packing import pack
from fedrad.common.protocol import ARRAYS

REPLY_POLL_SECONDS = 0.2  # a pull is one loopback/HTTPS round trip; 5 per second is next to nothing
REPLY_PULL_BACKOFF = (0.05, 0.5)  # (first, cap) seconds between tries of an object not yet at the SuperLink


def short_reply_backoff() -> bool:
    """Make the Grid pull a reply's arrays at REPLY_PULL_BACKOFF (idempotent); False when this Flower has no
    such puller (then Flower's own backoff applies, and the round is only slower)."""
    from flwr.superlink.grid import http_grid

    pull = getattr(http_grid, "pull_objects", None)
    if pull is None:
        return False
    if not getattr(pull, "fedrad_short_backoff", False):
        short = functools.partial(pull, initial_backoff=REPLY_PULL_BACKOFF[0], backoff_cap=REPLY_PULL_BACKOFF[1])
        short.fedrad_short_backoff = True  # type: ignore[attr-defined]
        http_grid.pull_objects = short
    return True


def packed(messages: Iterable[Message]) -> list[Message]:
    """The messages with their model arrays packed (fedrad.common.packing), in place; a record shared by
    several messages (Flower's configure_* sends one global model to every site) is packed once."""
    done: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}  # id(record) -> (record, packed): the id stays valid
    msgs = list(messages)
    for msg in msgs:
        if ARRAYS in msg.content.array_records:
            record = msg.content.array_records[ARRAYS]
            if id(record) not in done:
                done[id(record)] = (record, pack(record))
            msg.content[ARRAYS] = done[id(record)][1]
    return msgs


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
    return list(arriving_replies(grid, messages, timeout, times, interval))


def arriving_replies(grid: Grid, messages: Iterable[Message], timeout: float, times: RoundTimes,
                     interval: float = REPLY_POLL_SECONDS) -> Iterator[Message]:
    """`exchange`, yielding each reply as it is pulled, so a consumer that folds replies in one at a time
    (screening with spill-updates) never holds more than one pull's worth of updates. `times.wait` then also
    covers the consumer's work between pulls."""
    t0 = time.perf_counter()  # packing counts as sending
    msgs = packed(messages)
    if not msgs:
        return
    short_reply_backoff()
    pending = {mid for mid in grid.push_messages(msgs) if mid}  # a message Flower could not push reads None
    del msgs
    t1 = time.perf_counter()
    times.send += t1 - t0
    end = time.monotonic() + timeout
    try:
        while pending:
            got = list(grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            got.reverse()
            while got:
                yield got.pop()
            if not pending or time.monotonic() >= end:
                break
            time.sleep(min(interval, max(0.0, end - time.monotonic())))
    finally:
        times.wait += time.perf_counter() - t1


class PromptGrid:
    """The Grid as a Flower workflow that calls `send_and_receive` itself sees it (the SecAgg+ workflow: four
    exchanges per round, each paying Flower's fixed 3 s poll): the same push-then-pull, Flower's semantics
    (timeout None waits for every reply; replies only, no packing), pulled every REPLY_POLL_SECONDS."""

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_SECONDS) -> None:
        self._grid, self._interval = grid, interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        short_reply_backoff()
        pending = {mid for mid in self._grid.push_messages(messages) if mid}
        end = None if timeout is None else time.monotonic() + timeout
        got: list[Message] = []
        while pending:
            replies = list(self._grid.pull_messages(pending))
            got.extend(replies)
            pending.difference_update(m.metadata.reply_to_message_id for m in replies)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self._interval if end is None else min(self._interval, max(0.0, end - time.monotonic())))
        return got

    def __getattr__(self, name: str):  # everything else is the Grid's own
        return getattr(self._grid, name)

