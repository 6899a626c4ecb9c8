"""Aggregation weights stay FedAvg for honest sites of very different sizes and still bound a liar.

A 10x larger hospital, its maximum declared by the operator, is weighted 10x (the old 1.5x-median cap
counted it as 1.5x the small site); a site claiming 1e9 examples stays bounded, by its declaration or, when
nobody declared one, by the round's median and the share cap; a declared site grows at most
max-example-growth x its last accepted count per round. Real Flower strategy on real arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from test_server_units import _moved, _reply

from fedrad.common.run_config import RunConfig
from fedrad.server.round_modes import screening_rules
from fedrad.server.screening import CountBounds, read_site_maxima, screen_replies
from fedrad.server.strategies import build_strategy

NAMES = {"1": "big-hospital", "2": "small-clinic", "3": "liar", "4": "unknown"}


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros((4, 4), np.float32)),
                        "bn.num_batches_tracked": Array(np.array(1, np.int64))})


def _round(claims: dict[int, float], bounds: CountBounds, cfg: RunConfig | None = None):
    """Each site moves every weight by its node id (so the aggregate shows the weights used)."""
    g = _global()
    replies = [_reply(n, _moved(g, np.full(16, float(n))), c) for n, c in claims.items()]
    strategy = build_strategy(cfg or RunConfig())
    strategy.global_arrays = g
    kept, report = screen_replies(replies, g, screening_rules(cfg or RunConfig()), bounds=bounds)
    agg, _ = strategy.aggregate_train(1, kept)
    return float(agg["w"].numpy().mean()), report


def test_a_declared_large_site_is_weighted_by_its_size_and_a_liar_stays_bounded(tmp_path):
    maxima = tmp_path / "site-maxima.toml"
    maxima.write_text('"big-hospital" = 5000\n"small-clinic" = 200\n"liar" = 300\n')
    bounds = CountBounds(read_site_maxima(maxima), lambda: NAMES)
    mean, report = _round({1: 1200, 2: 120}, bounds)
    assert report.weights == {1: 1200.0, 2: 120.0} and not report.capped  # 10x larger, weighted 10x
    assert mean == pytest.approx((1200 * 1 + 120 * 2) / 1320, rel=1e-6)  # FedAvg, untouched
    mean, report = _round({1: 1200, 2: 120, 3: 1e9}, bounds)
    assert report.counted == {1: 1200, 2: 120, 3: 300}  # the declared liar: its own declaration
    assert "claimed 1e+09 examples, counted as 300 (the operator's maximum for liar)" == report.capped[3]
    assert report.weights[1] / report.weights[2] == pytest.approx(10.0)
    # growth: a declared site may not jump past max-example-growth (2) x its last accepted count
    _, report = _round({1: 5000, 2: 120}, bounds)
    assert report.counted[1] == 2400 and "at most 2x its last accepted count 1200" in report.capped[1]


def test_an_undeclared_liar_is_bounded_by_the_median_and_the_share_cap(tmp_path):
    maxima = tmp_path / "site-maxima.toml"
    maxima.write_text('"big-hospital" = 5000\n"small-clinic" = 200\n')
    bounds = CountBounds(read_site_maxima(maxima), lambda: NAMES)
    _, report = _round({1: 1200, 2: 120, 4: 1e9}, bounds)
    assert report.counted[4] == 1800 and "no maximum declared" in report.capped[4]  # 1.5 x median 1200
    total = sum(report.weights.values())
    assert report.weights[4] <= 0.5 * total * (1 + 1e-9)  # max-site-share: the undeclared site only
    assert report.weights[1] / report.weights[2] == pytest.approx(10.0)  # the declared sites keep FedAvg
    # without a declaration the old rule stands for everyone (a 10x site is counted 1.5x the median)
    _, report = _round({1: 1200, 2: 120}, CountBounds())
    assert report.weights[1] == report.weights[2]  # two undeclared sites: share cap 0.5, equal weights


def test_site_maxima_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('"a" = -3\n')
    with pytest.raises(ValueError, match="'a' must be a whole number"):
        read_site_maxima(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_site_maxima(tmp_path / "missing.toml")
    assert read_site_maxima("") == {}
