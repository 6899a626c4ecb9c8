"""Server pieces without processes: checkpoints round-trip exactly, screening rejects what it should, and
aggregation that a lying site cannot own (real Flower strategies on real arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedrad.common.packing import pack
from fedrad.common.run_config import RunConfig
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.screening import ScreeningRules, cap_shares, screen_replies
from fedrad.server.strategies import STRATEGIES, build_strategy


def _arrays(scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord({
        "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3) * scale),
        "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
        "b": Array(np.ones(3, dtype=np.float32) * scale),
    })


class _FakeFedOptState:
    """Holds the attributes Flower's FedOpt strategies keep between rounds."""

    def __init__(self) -> None:
        self.current_arrays = {"w": np.ones((2, 3), np.float32)}
        self.m_t = {"w": np.full((2, 3), 0.5, np.float32)}
        self.v_t = None


def test_checkpoint_round_trip_keeps_shapes_dtypes_order_and_state(tmp_path):
    arrays = _arrays()
    save_checkpoint(tmp_path, 1, arrays, _FakeFedOptState(), {"array_order": list(arrays.keys())})
    save_checkpoint(tmp_path, 2, _arrays(2.0), _FakeFedOptState(), {"array_order": list(arrays.keys())})
    assert latest_checkpoint(tmp_path).name == "round-0002.safetensors"
    restored = _FakeFedOptState()
    restored.m_t = None
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "round-0001.safetensors", restored)
    assert ckpt.server_round == 1
    assert list(ckpt.arrays.keys()) == list(arrays.keys())
    for key, arr in arrays.items():
        got = ckpt.arrays[key].numpy()
        assert got.shape == arr.numpy().shape and got.dtype == arr.numpy().dtype
        np.testing.assert_array_equal(got, arr.numpy())
    np.testing.assert_array_equal(restored.m_t["w"], np.full((2, 3), 0.5, np.float32))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def _reply(node: int, arrays: ArrayRecord, num_examples: float = 10, **metrics) -> Message:
    """A train reply as the SuperLink delivers it to the ServerApp (source = the site's node id), its arrays
    packed in fedrad's wire format in the order and dtypes they are given."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    values = {"num_examples": num_examples, "train_loss": 1.0, **metrics}
    return Message(content=RecordDict({"arrays": pack(arrays), "metrics": MetricRecord(values)}), metadata=meta)


@pytest.mark.parametrize("bad, reason", [
    (ArrayRecord({"w": Array(np.full((2, 3), np.nan, np.float32)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "NaN"),
    # packed, a reshaped array of the same size is the same bytes (shapes come from the global model); one of
    # another size makes the packed buffer the wrong length
    (ArrayRecord({"w": Array(np.zeros((3, 3), np.float32)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "the model's is (9,) float32"),
    (ArrayRecord({"b": Array(np.ones(3, np.float32)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "w": Array(np.full((2, 3), np.nan, np.float32))}), "NaN"),  # another order: NaN in 'w' and 'b'
    (ArrayRecord({"w": Array(np.zeros((2, 3), np.float64)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "are not the model's ['float32', 'int64']"),  # a float64 group
    (_arrays(1000.0), "update norm"),
])
def test_screening_rejects_bad_updates(bad, reason):
    global_arrays = _arrays(1.0)
    replies = [_reply(1, _arrays(1.01)), _reply(2, _arrays(0.99)), _reply(3, bad)]
    kept, report = screen_replies(replies, global_arrays, ScreeningRules(norm_factor=10.0))
    assert [int(m.metadata.src_node_id) for m in kept] == [1, 2]
    assert reason in report.rejected[3]


# --- aggregation a lying site cannot own ---------------------------------------------------------------

_DIM = 4000


def _model(rng: np.random.Generator) -> ArrayRecord:
    return ArrayRecord({"w": Array(rng.normal(size=(_DIM // 4, 4)).astype(np.float32)),
                        "bn.num_batches_tracked": Array(np.array(7, np.int64))})


def _moved(global_arrays: ArrayRecord, update: np.ndarray) -> ArrayRecord:
    w = global_arrays["w"].numpy()
    return ArrayRecord({"w": Array((w + update.reshape(w.shape)).astype(np.float32)),
                        "bn.num_batches_tracked": Array(np.array(10, np.int64))})


def _attack_round(attack: str, cfg: RunConfig | None = None, honest: int = 4, seed: int = 0):
    """`honest` sites whose updates share a direction (as training on similar data does) and one attacker;
    returns (global update after screening + the real Flower strategy, honest mean update, report)."""
    rng = np.random.default_rng(seed)
    cfg = cfg or RunConfig()
    g = _model(rng)
    common = rng.normal(size=_DIM)
    common /= np.linalg.norm(common)
    updates = [common + 0.5 * rng.normal(size=_DIM) / np.sqrt(_DIM) for _ in range(honest)]
    counts = [int(c) for c in rng.integers(40, 60, size=honest)]
    replies = [_reply(i + 1, _moved(g, u), n) for i, (u, n) in enumerate(zip(updates, counts, strict=True))]
    normal = float(np.median([np.linalg.norm(u) for u in updates]))
    other = rng.normal(size=_DIM)
    other -= other.dot(common) * common  # orthogonal to the honest direction, at a normal norm
    other *= normal / np.linalg.norm(other)
    bad = {
        "count_1e9": (other, 1e9),
        "count_nan": (other, float("nan")),
        "count_inf": (other, float("inf")),
        "count_zero": (other, 0),
        "count_negative": (other, -50),
        "count_fraction": (other, 12.5),
        "scaled_x5": (5 * updates[0], counts[0]),
        "sign_flip": (-updates[0], counts[0]),
    }[attack]
    replies.append(_reply(99, _moved(g, bad[0]), bad[1]))
    strategy = build_strategy(cfg)
    strategy.global_arrays = g
    from fedrad.server.round_modes import screening_rules

    kept, report = screen_replies(replies, g, screening_rules(cfg))
    agg, metrics = strategy.aggregate_train(1, kept)
    assert agg is not None
    result = agg["w"].numpy().astype(np.float64).ravel() - g["w"].numpy().astype(np.float64).ravel()
    honest_mean = np.average(np.stack(updates), axis=0, weights=counts)
    assert agg["bn.num_batches_tracked"].numpy().dtype == np.int64
    return result, honest_mean, report, metrics


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.dot(b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("attack", ["count_1e9", "count_nan", "count_inf", "count_zero", "count_negative",
                                    "count_fraction", "scaled_x5"])
def test_weight_and_scale_attacks_do_not_move_the_global_model(attack):
    result, honest_mean, report, metrics = _attack_round(attack)
    assert np.isfinite(result).all()
    assert _cos(result, honest_mean) >= 0.9, attack
    assert set(metrics) == {"train_loss"}  # the weighting key is the coordinator's and is not averaged
    if attack == "count_1e9":
        assert 99 in report.accepted and "claimed 1e+09" in report.capped[99]
        assert report.weights[99] <= 1.5 * max(w for n, w in report.weights.items() if n != 99)
    else:
        assert 99 in report.rejected


def test_without_the_caps_a_lying_count_owns_the_model():
    """The same 1e9 attack with the count and share caps off: the attacker takes over (what the caps stop)."""
    loose = RunConfig(max_example_factor=0.0, max_site_share=1.0)
    result, honest_mean, _, _ = _attack_round("count_1e9", loose)
    assert _cos(result, honest_mean) < 0.1


def test_sign_flip_at_normal_norm_is_not_caught_by_the_norm_screen_only_bounded():
    """The stated limit: a sign-flipped update at a normal norm passes the norm screen; its weight share is
    what bounds it (here one site in five)."""
    result, honest_mean, report, _ = _attack_round("sign_flip")
    assert 99 in report.accepted
    assert _cos(result, honest_mean) > 0.5


def test_all_counts_invalid_keeps_the_global_model_without_crashing():
    rng = np.random.default_rng(3)
    g = _model(rng)
    replies = [_reply(i, _moved(g, rng.normal(size=_DIM) * 0.01), n) for i, n in enumerate([0, 0, float("nan")])]
    strategy = build_strategy(RunConfig())
    strategy.global_arrays = g
    kept, report = screen_replies(replies, g, ScreeningRules())
    assert kept == [] and len(report.rejected) == 3
    assert strategy.aggregate_train(1, kept) == (None, None)
    assert "usable updates" in strategy.last_refusal


def test_non_finite_aggregate_is_refused():
    """The finite gate after aggregation: finite replies whose aggregate overflows (FedAdam's update from
    -3e38 to +3e38 is inf in float32) leave the global model as it was."""
    g = ArrayRecord({"w": Array(np.full((4, 4), -3e38, np.float32)), "n": Array(np.array(1, np.int64))})
    far = ArrayRecord({"w": Array(np.full((4, 4), 3e38, np.float32)), "n": Array(np.array(2, np.int64))})
    replies = [_reply(i, far, 10) for i in range(3)]
    strategy = build_strategy(RunConfig(strategy="fedadam"))
    strategy.global_arrays = g
    strategy.current_arrays = {k: a.numpy() for k, a in g.items()}  # as FedAdam's configure_train would
    kept, _ = screen_replies(replies, g, ScreeningRules(norm_factor=0.0))
    assert len(kept) == 3
    agg, _ = strategy.aggregate_train(1, kept)
    assert agg is None and "not finite" in strategy.last_refusal


def test_cap_shares():
    assert cap_shares({1: 10.0, 2: 10.0, 3: 80.0}, 0.5) == pytest.approx({1: 10.0, 2: 10.0, 3: 20.0})
    assert cap_shares({1: 1.0, 2: 9.0}, 0.5) == {1: 1.0, 2: 1.0}  # two sites, cap 0.5: equal weights
    capped = cap_shares({1: 1.0, 2: 2.0, 3: 3.0, 4: 100.0, 5: 100.0}, 0.3)
    total = sum(capped.values())
    assert max(capped.values()) / total <= 0.3 + 1e-9 and capped[1] == 1.0


def test_strategy_names_match_and_secagg_refuses_what_a_masked_sum_cannot_run():
    from fedrad.common.run_config import STRATEGY_NAMES

    assert set(STRATEGIES) == set(STRATEGY_NAMES)
    for name, reason in STRATEGY_NAMES.items():
        if reason is None:
            assert RunConfig(secagg=True, strategy=name).aggregation.startswith(name)
        else:
            with pytest.raises(ValueError, match=f"secagg=true cannot run strategy '{name}'"):
                RunConfig.from_flower({"secagg": True, "strategy": name})
    with pytest.raises(ValueError, match="unknown 'bogus'"):
        RunConfig(strategy="bogus")
    assert RunConfig(strategy="krum").aggregation == "krum"
