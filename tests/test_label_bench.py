"""The label-efficiency benchmark's own logic: its hospital split, best-single-site pick, goal checks, DP noise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_label_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_label_efficiency", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(backbone, mode, frac, auc, half=0.02):
    return {"backbone": backbone, "mode": mode, "fraction": frac, "auc": auc, "ci_low": auc - half,
            "ci_high": auc + half}


def test_hospitals_are_label_skewed_partition(bench):
    labels = np.array([0] * 1000 + [1] * 2000)
    assign = bench.hospital_of(labels, seed=3)
    assert set(assign.tolist()) == {0, 1, 2}  # every image in exactly one hospital
    for c, shares in bench.LABEL_SKEW.items():
        counts = np.bincount(assign[labels == c], minlength=3) / (labels == c).sum()
        np.testing.assert_allclose(counts, shares, atol=1e-3)
    assert not np.array_equal(assign, bench.hospital_of(labels, seed=4))  # the seed shuffles who goes where


def test_best_single_site_is_picked_per_cell(bench):
    rows = [_row("single-site-h0", "linear", 0.01, 0.80), _row("single-site-h1", "linear", 0.01, 0.85),
            _row("single-site-h0", "linear", 0.1, 0.90), _row("single-site-h1", "linear", 0.1, 0.88)]
    best = {r["fraction"]: r for r in bench.best_single_rows(rows)}
    assert best[0.01]["auc"] == 0.85 and best[0.01]["site"] == "h1"
    assert best[0.1]["auc"] == 0.90 and best[0.1]["site"] == "h0"
    assert all(r["backbone"] == bench.BEST_SINGLE for r in best.values())


def _table(fed1, rnd1=0.85, single1=0.86, cen=0.90, fed_full=0.9, rnd_full=0.9):
    rows = []
    for frac in bench_fracs():
        rows += [_row("random-init", "linear", frac, rnd1), _row("centralised", "linear", frac, cen),
                 _row("federated", "linear", frac, fed1), _row("random-init", "full", frac, rnd_full),
                 _row("federated", "full", frac, fed_full)]
    rows.append(dict(_row("best single site", "linear", 0.01, single1), site="h2"))
    return rows


def bench_fracs():
    return (0.01, 0.1, 1.0)


def test_goals_met_and_missed(bench):
    met = dict((text, ok) for text, ok, _ in bench.check_goals(_table(fed1=0.905)))
    assert all(met.values()), met
    missed = {text: ok for text, ok, _ in bench.check_goals(_table(fed1=0.88, cen=0.90, fed_full=0.80))}
    assert missed["linear 1 %: federated >= random-init + 0.05"] is False  # 0.88 < 0.85 + 0.05
    assert missed["linear 1 %: federated >= best single site"] is True  # 0.88 >= 0.86
    assert missed["linear 10 %: federated within 0.01 of centralised"] is False  # 0.02 below
    assert missed["full fine-tune: federated never worse than random-init beyond the CI"] is False  # 0.82 < 0.90
    lines = bench.format_goals(bench.check_goals(_table(fed1=0.88)))
    assert any(line.startswith("- MISSED") for line in lines) and any(line.startswith("- met") for line in lines)


def test_goals_not_run_without_arms(bench):
    goals = bench.check_goals([_row("random-init", "linear", 0.01, 0.8)])
    assert {ok for _, ok, _ in goals} == {None}


def test_dp_noise_spends_at_most_the_budget(bench):
    from fedrad.client.training.sample_dp import epsilon_of, sample_rate

    noise = bench.dp_noise_for(8.0, 1e-5, 64, 1100, 200)
    q = sample_rate(64, 1100)
    assert epsilon_of([(noise, q, 200)], 1e-5) <= 8.0
    assert epsilon_of([(noise - 0.01, q, 200)], 1e-5) > 7.9  # not needlessly noisy


def test_pretraining_seeds_are_averaged_per_cell(bench):
    """Each (backbone, mode, fraction) cell is the mean over pretraining seeds, keeping each seed's AUC and
    their sd; a cell measured on one seed only (mlp/full) passes through unchanged."""
    def row(name, mode, auc, lo, hi, seed):
        return {"backbone": name, "mode": mode, "fraction": 0.01, "auc": auc, "ci_low": lo, "ci_high": hi,
                "pretrain_seed": seed}

    rows = [row("federated", "linear", 0.90, 0.88, 0.92, 0), row("federated", "linear", 0.93, 0.91, 0.95, 1),
            row("federated", "full", 0.85, 0.80, 0.90, 0)]
    out = {(r["backbone"], r["mode"]): r for r in bench.combine_pretrain_seeds(rows)}
    lin = out[("federated", "linear")]
    assert lin["auc"] == pytest.approx(0.915) and lin["ci_low"] == pytest.approx(0.895)
    assert lin["ci_high"] == pytest.approx(0.935)
    assert lin["auc_per_pretrain_seed"] == [0.90, 0.93] and lin["auc_pretrain_sd"] == pytest.approx(0.015)
    assert lin["pretrain_seeds"] == 2
    full = out[("federated", "full")]
    assert full["auc"] == 0.85 and full["pretrain_seeds"] == 1 and full["auc_pretrain_sd"] == 0.0
