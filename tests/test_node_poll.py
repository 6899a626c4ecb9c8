"""The site's SuperNode runs Flower's own loop with its idle sleep capped (client/runtime/node_poll.py)."""

from __future__ import annotations

import inspect
import time

import flwr.supernode.start_client_internal as loop
import pytest

from fedrad.client.runtime.node_poll import (
    FAST_POLL_WINDOW_SECONDS,
    IDLE_POLL_SECONDS,
    REPLY_POLL_SECONDS,
    PollClock,
    capped_sleep,
    patch_supernode_loop,
    retry_transient,
)


def test_supernode_idle_sleep_is_capped_in_that_module_only(monkeypatch) -> None:
    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source  # the fixed idle sleep this module caps is still there
    assert source.count("time.sleep(0.5)") == 2  # the local waits for the reply and its objects
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(loop, "_push_messages", loop._push_messages)
    monkeypatch.setattr(time, "sleep", slept.append)
    assert patch_supernode_loop() is True
    loop.time.sleep(3)  # no run yet: Flower's own idle interval
    loop.time.sleep(0.5)  # a message being worked on: the local wait is short, and the site is now in a run
    loop.time.sleep(3)
    loop.time.sleep(0.01)
    assert slept == [3.0, REPLY_POLL_SECONDS, IDLE_POLL_SECONDS, 0.01]
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


def test_idle_pulls_are_fast_only_while_the_site_is_in_a_run() -> None:
    """A site that worked on a message in the last FAST_POLL_WINDOW_SECONDS pulls every IDLE_POLL_SECONDS; one
    idle longer goes back to Flower's 3 s (each fast pull is a request the coordinator answers)."""
    now = [1000.0]
    clock = PollClock(now=lambda: now[0])
    assert clock.seconds(3) == 3.0  # started, no run: Flower's interval
    assert clock.seconds(0.5) == REPLY_POLL_SECONDS  # a ClientApp is working
    now[0] += FAST_POLL_WINDOW_SECONDS - 1
    assert clock.seconds(3) == IDLE_POLL_SECONDS  # between rounds: the next message is seen within 0.5 s
    now[0] += 2
    assert clock.seconds(3) == 3.0  # the run is over (or the site waits long for the others): Flower's again
    assert clock.seconds(0.2) == REPLY_POLL_SECONDS and clock.seconds(3) == IDLE_POLL_SECONDS


def test_a_reply_handed_over_leaves_within_the_reply_poll(monkeypatch) -> None:
    """Flower's _push_messages waits in its local state for the reply: patched, it looks every 0.05 s."""
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(loop, "_push_messages", loop._push_messages)
    monkeypatch.setattr(time, "sleep", slept.append)
    patch_supernode_loop()
    checks = iter([[], [], ["reply"]])

    class State:
        def get_messages_legacy(self, is_reply):
            return next(checks)

    with pytest.raises(AttributeError):  # a stand-in reply: stops right after the wait this test is about
        loop._push_messages(State(), None, None, None)
    assert slept == [REPLY_POLL_SECONDS, REPLY_POLL_SECONDS]


def _http_error(status: int):
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/fleet/push-object")
    return httpx.HTTPStatusError(f"{status}", request=request, response=httpx.Response(status, request=request))


def test_a_push_the_superlink_fails_with_5xx_is_tried_again(monkeypatch) -> None:
    """At 20 sites Flower's SuperLink answers some concurrent pushes with 500 (SQLite "database is locked") and
    the SuperNode dropped that reply: the round then waited its round-timeout for the site."""
    import httpx

    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls: list[tuple] = []

    def push(*args):
        calls.append(args)
        if len(calls) < 3:
            raise _http_error(500)
        return "stored"

    assert retry_transient(push)(7, "session", "obj", b"x") == "stored" and len(calls) == 3
    calls.clear()
    with pytest.raises(httpx.HTTPStatusError):  # a refusal is not retried
        retry_transient(lambda: calls.append(1) or (_ for _ in ()).throw(_http_error(403)))()
    assert calls == [1]
    calls.clear()

    def down():
        calls.append(1)
        raise _http_error(503)

    with pytest.raises(httpx.HTTPStatusError):  # the last failure stands after `tries`
        retry_transient(down, tries=4)()
    assert len(calls) == 4


def test_the_loop_pushes_replies_through_the_retry(monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(loop, "_push_messages", lambda **kw: seen.update(kw))
    assert patch_supernode_loop() is True

    def send(*a):
        raise _http_error(500)

    loop._push_messages(state="s", object_store="o", send=send, push_object=send)
    assert seen["state"] == "s" and seen["send"] is send and seen["push_object"].__wrapped__ is send
