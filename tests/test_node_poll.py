"""The site's SuperNode runs Flower's own loop with its idle sleep capped (client/runtime/node_poll.py)."""

from __future__ import annotations

import inspect
import time

import flwr.supernode.start_client_internal as loop
import pytest

from fedrad.client.runtime.node_poll import (
    IDLE_POLL_SECONDS,
    REPLY_POLL_SECONDS,
    capped_sleep,
    patch_supernode_loop,
)


def test_supernode_idle_sleep_is_capped_in_that_module_only(monkeypatch) -> None:
    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source  # the fixed idle sleep this module caps is still there
    assert source.count("time.sleep(0.5)") == 2  # the local waits for the reply and its objects
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(time, "sleep", slept.append)
    assert patch_supernode_loop() is True
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(0.01)
    assert slept == [IDLE_POLL_SECONDS, REPLY_POLL_SECONDS, 0.01]
    assert loop.time.time is time.time and loop.time is not time  # the rest of `time` unchanged, global untouched
    from fedrad.client.runtime.site_runtime import PULL_BACKOFF

    assert (loop.pull_objects.keywords["initial_backoff"], loop.pull_objects.keywords["backoff_cap"]) == PULL_BACKOFF


@pytest.mark.parametrize("flower,expected", [(3, IDLE_POLL_SECONDS), (10.0, IDLE_POLL_SECONDS),
                                             (0.5, REPLY_POLL_SECONDS), (0.2, REPLY_POLL_SECONDS), (0.01, 0.01),
                                             (0.0, 0.0)])
def test_idle_poll_and_local_reply_waits_are_capped_apart(flower, expected) -> None:
    """The idle pull from the SuperLink (an RPC) stays at <= 0.5 s; the local reply lookup goes to 0.05 s."""
    assert capped_sleep(flower) == expected
    assert REPLY_POLL_SECONDS < IDLE_POLL_SECONDS


def test_a_reply_handed_over_leaves_within_the_reply_poll(monkeypatch) -> None:
    """Flower's _push_messages waits in its local state for the reply: patched, it looks every 0.05 s."""
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(time, "sleep", slept.append)
    patch_supernode_loop()
    checks = iter([[], [], ["reply"]])

    class State:
        def get_messages_legacy(self, is_reply):
            return next(checks)

    with pytest.raises(AttributeError):  # a stand-in reply: stops right after the wait this test is about
        loop._push_messages(State(), None, None, None)
    assert slept == [REPLY_POLL_SECONDS, REPLY_POLL_SECONDS]
