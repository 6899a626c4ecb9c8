"""The site's SuperNode runs Flower's own loop with its idle sleep capped (client/runtime/node_poll.py)."""

from __future__ import annotations

import inspect
import time

import flwr.supernode.start_client_internal as loop

from fedrad.client.runtime.node_poll import IDLE_POLL_SECONDS, patch_supernode_loop


def test_supernode_idle_sleep_is_capped_in_that_module_only(monkeypatch) -> None:
    assert "time.sleep(3)" in inspect.getsource(loop)  # the fixed idle sleep this module caps is still there
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(time, "sleep", slept.append)
    assert patch_supernode_loop() is True
    loop.time.sleep(3)
    loop.time.sleep(0.1)
    assert slept == [IDLE_POLL_SECONDS, 0.1]
    assert loop.time.time is time.time and loop.time is not time  # the rest of `time` unchanged, global untouched
    from fedrad.client.runtime.site_runtime import PULL_BACKOFF

    assert (loop.pull_objects.keywords["initial_backoff"], loop.pull_objects.keywords["backoff_cap"]) == PULL_BACKOFF
