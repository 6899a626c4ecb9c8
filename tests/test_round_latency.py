"""Round latency pieces without processes: no evaluate message when fraction-evaluate = 0, replies seen
within the short poll interval (not Flower's 3 s), the round timeout still bounds the wait, and the
round's timing fields add up."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrad.common.run_config import RunConfig
from fedrad.server.exchange import REPLY_POLL_SECONDS, RoundTimes, exchange
from fedrad.server.rounds import RunState, _evaluate, _time_fields
from fedrad.server.strategies import build_strategy


@pytest.fixture(autouse=True)
def _in_a_serverapp(monkeypatch):
    """Flower builds messages with the run id its ServerApp process was started for."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _RecordingGrid:
    """A Grid's push/pull surface: replies become visible `delay` s after the push (None: never)."""

    def __init__(self, nodes: list[int], delay: float | None) -> None:
        self.nodes, self.delay = nodes, delay
        self.pushed: list[Message] = []
        self.pulls = 0
        self._pushed_at = 0.0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        self._pushed_at = time.monotonic()
        ids = []
        for i, msg in enumerate(messages):
            self.pushed.append(msg)
            ids.append(f"q{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.delay is None or time.monotonic() - self._pushed_at < self.delay:
            return []
        return [_reply(self.nodes[int(mid[1:])], mid) for mid in message_ids]


def _reply(node: int, reply_to: str) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=reply_to,
                    group_id="1", created_at=0.0, ttl=60.0, message_type="evaluate")
    return Message(content=RecordDict({"metrics": MetricRecord({"num_examples": 4, "eval_loss": 0.5})}), metadata=meta)


def _state(grid, tmp_path, **overrides) -> RunState:
    cfg = RunConfig(**{"min_train_nodes": 1, "min_available_nodes": 1, **overrides})
    return RunState(grid, cfg, tmp_path, build_strategy(cfg), "k", ["w"])


def _arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.ones(3, np.float32))})


def test_fraction_evaluate_zero_sends_no_evaluate_message(tmp_path):
    grid = _RecordingGrid([11, 12], delay=0.0)
    times = RoundTimes()
    metrics, sites = _evaluate(_state(grid, tmp_path, fraction_evaluate=0.0), 1, _arrays(), times)
    assert (metrics, sites) == ({}, {})
    assert grid.pushed == [] and grid.pulls == 0 and times.wait == 0.0


def test_evaluate_is_sent_and_timed_when_asked(tmp_path):
    grid = _RecordingGrid([11, 12], delay=0.0)
    times = RoundTimes()
    metrics, sites = _evaluate(_state(grid, tmp_path, fraction_evaluate=1.0), 1, _arrays(), times)
    assert len(grid.pushed) == 2 and {m.metadata.message_type for m in grid.pushed} == {"evaluate"}
    assert set(sites) == {"11", "12"} and metrics["eval_loss"] == 0.5
    assert times.send > 0 and times.wait >= 0 and times.aggregate > 0


def test_reply_is_seen_within_the_poll_interval_not_flowers_three_seconds():
    grid = _RecordingGrid([11], delay=0.5)
    times = RoundTimes()
    t0 = time.perf_counter()
    replies = exchange(grid, [Message(RecordDict(), dst_node_id=11, message_type="train")], 30.0, times)
    took = time.perf_counter() - t0
    assert len(replies) == 1
    assert 0.5 <= took < 0.5 + REPLY_POLL_SECONDS + 0.5, took
    assert times.wait >= 0.5 and times.send >= 0.0


def test_round_timeout_bounds_the_wait_for_a_silent_site():
    grid = _RecordingGrid([11], delay=None)
    times = RoundTimes()
    t0 = time.perf_counter()
    assert exchange(grid, [Message(RecordDict(), dst_node_id=11, message_type="train")], 0.6, times) == []
    assert 0.6 <= time.perf_counter() - t0 < 1.5


def test_time_fields_overhead_is_round_minus_slowest_site():
    times = RoundTimes(send=0.1, wait=5.0, aggregate=0.2, site_compute_max=4.5, train=5.3, checkpoint=0.4)
    fields = _time_fields(times, 6.0)
    assert fields["time_overhead"] == 1.5 and fields["round_seconds"] == 6.0
    assert set(fields) == {"time_send", "time_wait", "time_site_compute_max", "time_aggregate", "time_train",
                           "time_checkpoint", "round_seconds", "time_overhead"}


def test_secagg_workflows_grid_pulls_at_the_short_interval_with_flowers_semantics():
    """The Grid handed to Flower's SecAgg+ workflow (server/secagg.py): its send_and_receive polls every
    REPLY_POLL_SECONDS (several pulls before a reply 1 s late, Flower's loop would pull twice), waits for every
    reply with timeout None, and stops at a timeout."""
    from fedrad.server.exchange import PromptGrid

    grid = _RecordingGrid([11, 12], delay=1.0)
    prompt = PromptGrid(grid)
    assert prompt.get_node_ids() == [11, 12]
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    replies = prompt.send_and_receive(msgs, timeout=None)
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    assert grid.pulls >= 3
    silent = _RecordingGrid([11], delay=None)
    assert PromptGrid(silent).send_and_receive([Message(RecordDict(), dst_node_id=11, message_type="train")],
                                               timeout=0.5) == []
