"""fedrad.client.supernode shortens exactly the waits of flwr 1.41's SuperNode loop it means to, and nothing
else: if a Flower upgrade moves them, these fail instead of the site silently falling back to 3 s polls."""

from __future__ import annotations

import functools
import inspect
import time

from fedrad.client import supernode


def test_the_pinned_flower_loop_still_has_the_waits_that_are_shortened():
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    params = inspect.signature(loop.pull_objects).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(params)


def test_shorten_waits_maps_flowers_sleeps_and_backoff(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    supernode.shorten_waits()
    supernode.shorten_waits()  # idempotent: no partial of a partial
    assert isinstance(loop.pull_objects, functools.partial)
    assert not isinstance(loop.pull_objects.func, functools.partial)
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    t0 = time.monotonic()
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    assert time.monotonic() - t0 < supernode.IDLE_POLL_SECONDS + supernode.REPLY_POLL_SECONDS + 0.5


def test_node_command_starts_flowers_supernode_through_the_launcher():
    from fedrad.deploy.processes import supernode_command

    cmd = supernode_command("127.0.0.1:8000", 9094, {"data-dir": "/x"})
    node = cmd[cmd.index("--") + 1:]
    assert node[node.index("-m") + 1] == "fedrad.client.supernode" and "--superlink" in node
