"""Streaming aggregation (screen_stream + aggregate_screened): the same screening decisions and the same
aggregate as screening the whole reply list and letting Flower's strategy aggregate it, on random arrays."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedrad.common.packing import pack
from fedrad.common.run_config import RunConfig
from fedrad.server.round_modes import screening_rules
from fedrad.server.screening import UpdateSpill, drain, screen_replies, screen_stream
from fedrad.server.strategies import MEAN_STRATEGIES, build_strategy


def _model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"conv.weight": (rng.normal(size=(8, 4, 3, 3)) * scale).astype(np.float32),
            "bn.num_batches_tracked": np.array(int(rng.integers(0, 100)), np.int64),
            "fc.weight": (rng.normal(size=(5, 32)) * scale).astype(np.float32),
            "fc.bias": (rng.normal(size=5) * scale).astype(np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray], num_examples: float, **metrics) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    values = {"num_examples": num_examples, "train_loss": float(node) / 10, **metrics}
    return Message(content=RecordDict({"arrays": pack({k: np.asarray(v) for k, v in arrays.items()}),
                                       "metrics": MetricRecord(values)}), metadata=meta)


def _round(seed: int) -> tuple[ArrayRecord, list[Message]]:
    """Ten replies: honest ones at random counts, one far outlier, one with NaN, one of the wrong shape, one
    claiming a huge count (capped), one with a bad count (rejected)."""
    rng = np.random.default_rng(seed)
    g = _model(rng)
    replies = []
    for node in range(1, 7):
        moved = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + node
                 for k, v in g.items()}
        replies.append(_reply(node, moved, float(rng.integers(20, 80))))
    replies.append(_reply(7, {k: v * 50 if v.dtype.kind == "f" else v for k, v in g.items()}, 40.0))
    replies.append(_reply(8, {**g, "fc.bias": np.full(5, np.nan, np.float32)}, 40.0))
    replies.append(_reply(9, {**g, "fc.weight": np.zeros((33, 5), np.float32)}, 40.0))  # packed: the wrong length
    replies.append(_reply(10, dict(g), 1e6))
    replies.append(_reply(11, dict(g), -3.0))
    return ArrayRecord({k: Array(v) for k, v in g.items()}), replies


def _strategy(name: str, g: ArrayRecord):
    strategy = build_strategy(RunConfig(strategy=name))
    strategy.global_arrays = g
    # as Flower's configure_train sets it: FedAvgM keeps an ArrayRecord, FedOpt a dict of arrays
    strategy.current_arrays = g.copy() if name == "fedavgm" else {k: a.numpy() for k, a in g.items()}
    return strategy


@pytest.mark.parametrize("name", MEAN_STRATEGIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_aggregate_equals_the_list_aggregate(name: str, seed: int, tmp_path):
    g, replies = _round(seed)
    rules = screening_rules(RunConfig(strategy=name))
    kept, before = screen_replies(list(replies), g, rules)
    want_arrays, want_metrics = _strategy(name, g).aggregate_train(1, kept)

    with UpdateSpill(g, tmp_path) as spill:
        updates, after = screen_stream(drain(replies), g, rules, spill)
        assert not replies  # every reply was taken off the list as it was screened
        got_arrays, got_metrics = _strategy(name, g).aggregate_screened(1, updates, spill)
    assert not list(tmp_path.iterdir())  # the spilled updates are gone with the round

    for field in ("accepted", "rejected", "update_norms", "weights", "counted", "capped"):
        assert getattr(after, field) == getattr(before, field), field
    assert set(before.rejected) == {7, 8, 9, 11} and 10 in before.capped  # the round exercises every rule
    assert list(got_arrays.keys()) == list(want_arrays.keys())
    for key in want_arrays.keys():
        want, got = want_arrays[key].numpy(), got_arrays[key].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=key)
        if name in ("fedavg", "fedprox"):
            np.testing.assert_array_equal(got, want, err_msg=key)  # the same operations in the same order
    assert dict(got_metrics) == pytest.approx(dict(want_metrics))


def test_streamed_round_below_the_minimum_keeps_the_model(tmp_path):
    g, replies = _round(0)
    cfg = RunConfig(min_train_nodes=8)
    strategy = build_strategy(cfg)
    strategy.global_arrays = g
    with UpdateSpill(g, tmp_path) as spill:
        updates, _ = screen_stream(drain(replies), g, screening_rules(cfg), spill)
        assert strategy.aggregate_screened(1, updates, spill) == (None, None)
    assert "usable updates" in strategy.last_refusal


class _ReplyingGrid:
    """A Grid's push/pull surface whose sites answer every train message with `answer(node, index)` at once."""

    def __init__(self, nodes: list[int], answer) -> None:
        self.nodes, self.answer = nodes, answer

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        self.sent = [int(m.metadata.dst_node_id) for m in messages]
        return [f"q{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            reply = self.answer(self.sent[int(mid[1:])])
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out


def test_a_round_with_spill_updates_aggregates_as_the_in_memory_round(tmp_path, monkeypatch):
    """PlainRounds.train end to end on a stand-in grid: spill-updates on and off give the same global model,
    the same screening report, and leave no spill file in the run folder."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.server.exchange import RoundTimes
    from fedrad.server.round_modes import PlainRounds

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    g, replies = _round(3)
    by_node = {int(m.metadata.src_node_id): m for m in replies}
    outcomes = {}
    for spill in (False, True):
        run_dir = tmp_path / f"spill-{spill}"
        run_dir.mkdir()
        cfg = RunConfig(min_train_nodes=2, min_available_nodes=len(by_node), round_timeout=5.0,
                        spill_updates=spill)
        grid = _ReplyingGrid(sorted(by_node), lambda node: _reply(node, {k: a.numpy() for k, a in
                                                                      by_node[node].content["arrays"].items()},
                                                               by_node[node].content["metrics"]["num_examples"]))
        outcomes[spill] = PlainRounds(grid, cfg, build_strategy(cfg), "k", run_dir).train(1, g, RoundTimes())
        assert not [p for p in run_dir.rglob("*") if p.is_file()], "a spilled update was left behind"
    off, on = outcomes[False], outcomes[True]
    assert off.arrays is not None and off.aggregated == 7 and len(off.rejected) == 4 and off.capped
    assert on.rejected == off.rejected and on.capped == off.capped and on.aggregated == off.aggregated
    for key, arr in off.arrays.items():
        np.testing.assert_allclose(on.arrays[key].numpy(), arr.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_server_step_moves_weights_but_averages_batchnorm_statistics(name: str, streamed: bool, tmp_path):
    """FedAvgM/FedAdam/FedYogi step the weights from the mean, but BatchNorm running statistics are the plain
    weighted mean: stepped like weights, a shrinking variance at server-lr 3 went below zero (NaN downstream)."""
    rng = np.random.default_rng(3)
    g = {**_model(rng), "bn.running_mean": np.zeros(8, np.float32), "bn.running_var": np.ones(8, np.float32)}
    replies, sent, counts = [], [], [30.0, 40.0, 35.0]  # within the screening caps: weights as claimed
    for node, count in enumerate(counts, start=1):
        moved = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + node
                 for k, v in g.items()}
        moved["bn.running_var"] = np.full(8, 0.5 - 0.1 * node, np.float32)  # every site's variance shrank
        sent.append(moved)
        replies.append(_reply(node, moved, count))
    want_var = sum((0.5 - 0.1 * n) * c for n, c in enumerate(counts, start=1)) / sum(counts)
    global_record = ArrayRecord({k: Array(v) for k, v in g.items()})
    cfg = RunConfig(strategy=name, server_lr=3.0)
    rules = screening_rules(cfg)
    strategy = build_strategy(cfg)
    strategy.global_arrays = global_record
    strategy.current_arrays = (global_record.copy() if name == "fedavgm"
                               else {k: a.numpy() for k, a in global_record.items()})
    if streamed:
        with UpdateSpill(global_record, tmp_path) as spill:
            updates, _ = screen_stream(drain(replies), global_record, rules, spill)
            arrays, _ = strategy.aggregate_screened(1, updates, spill)
    else:
        kept, _ = screen_replies(list(replies), global_record, rules)
        arrays, _ = strategy.aggregate_train(1, kept)
    assert arrays is not None, strategy.last_refusal
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), want_var, rtol=1e-6)
    assert arrays["bn.running_var"].numpy().dtype == np.float32
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    # the weights did take the server step: not the plain mean of the replies
    plain = sum(m["fc.bias"] * c for m, c in zip(sent, counts, strict=True)) / sum(counts)
    assert not np.allclose(arrays["fc.bias"].numpy(), plain, atol=1e-3)


def test_a_robust_strategy_keeps_its_robust_batchnorm_statistics():
    """Only the server-step strategies take the statistics as the mean: FedMedian's stay the median, so one
    site cannot pull them by itself."""
    rng = np.random.default_rng(4)
    g = {**_model(rng), "bn.running_var": np.ones(8, np.float32)}
    replies = []
    for node, var in enumerate((0.3, 0.4, 2.5), start=1):  # site 3 pulls the variance (within the norm screen)
        replies.append(_reply(node, {**g, "bn.running_var": np.full(8, var, np.float32)}, 40.0))
    global_record = ArrayRecord({k: Array(v) for k, v in g.items()})
    cfg = RunConfig(strategy="fedmedian")
    strategy = build_strategy(cfg)
    strategy.global_arrays = global_record
    kept, _ = screen_replies(list(replies), global_record, screening_rules(cfg))
    assert len(kept) == 3
    arrays, _ = strategy.aggregate_train(1, kept)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), 0.4, rtol=1e-6)  # the mean would be 1.07
