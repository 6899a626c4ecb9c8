"""The run's plot reads as a person expects: whole-number rounds, sites called "site N", node ids kept in
metrics.jsonl."""

from __future__ import annotations

import json

from fedrad.server.run_log import append_metrics, plot_run, read_metrics, run_figure, site_labels

NODES = ["8141923344119028735", "1234567890123456789", "5555555555555555555"]


def _rows():
    rows = []
    for rnd in range(1, 6):
        present = NODES if rnd > 1 else NODES[:2]  # the third site joins in round 2
        rows.append({"round": rnd, "train_loss": 2.0 - 0.1 * rnd, "eval_loss": 2.1 - 0.08 * rnd,
                     "sites": {n: {"train_loss": 2.0 - 0.1 * rnd + 0.05 * i, "num_examples": 40}
                               for i, n in enumerate(present)}})
    return rows


def test_sites_are_numbered_in_order_of_first_appearance():
    labels = site_labels(_rows())
    assert labels == {NODES[0]: "site 1", NODES[1]: "site 2", NODES[2]: "site 3"}


def test_plot_uses_site_names_and_integer_rounds(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    fig = run_figure(_rows())
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["site 1", "site 2", "site 3"]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    for row in _rows():
        append_metrics(tmp_path, row)
    out = plot_run(tmp_path)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # metrics.jsonl keeps the node ids
    assert set(read_metrics(tmp_path)[-1]["sites"]) == set(NODES)
    assert NODES[0] in (tmp_path / "metrics.jsonl").read_text() and json.loads(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[0])["round"] == 1


def test_enrolled_site_names_label_the_plot_and_unnamed_sites_stay_numbered():
    """A round's `site_names` (names given at enrolment) win; a node without one is "site N"."""
    import matplotlib

    matplotlib.use("Agg")
    rows = _rows()
    for row in rows[1:]:
        row["site_names"] = {NODES[0]: "st-marys", NODES[2]: "charite"}
    assert site_labels(rows) == {NODES[0]: "st-marys", NODES[1]: "site 1", NODES[2]: "charite"}
    legend = [t.get_text() for t in run_figure(rows).axes[1].get_legend().get_texts()]
    assert legend == ["st-marys", "site 1", "charite"]


def test_a_long_run_plots_at_most_about_200_rounds_and_keeps_the_last():
    from fedrad.server.run_log import PLOT_POINTS, thin_rows

    rows = [{"round": r} for r in range(1, 10_001)]
    kept = thin_rows(rows)
    assert len(kept) <= PLOT_POINTS + 1 and kept[0]["round"] == 1 and kept[-1]["round"] == 10_000
    assert thin_rows(rows[:150]) == rows[:150]


def test_each_round_parses_only_its_new_line_and_names_sites_without_a_pass_over_every_round(tmp_path, monkeypatch):
    """Per-round coordinator work does not grow with the round number: after follow_metrics, a round parses
    only the lines appended since the last one, and the per-site labels come from the sites seen so far."""
    from fedrad.server import run_log

    rows = _rows() * 40  # 200 rounds
    for i, row in enumerate(rows, 1):
        append_metrics(tmp_path, {**row, "round": i})
    run_log.follow_metrics(tmp_path)
    expected = site_labels(read_metrics(tmp_path))
    assert run_log.run_site_labels(tmp_path) == expected and len(expected) == 3
    seen: list[int] = []
    real_add = run_log.SiteOrder.add
    monkeypatch.setattr(run_log.SiteOrder, "add", lambda self, new: (seen.append(len(new)), real_add(self, new)))
    monkeypatch.setattr(run_log, "site_labels", lambda rows: (_ for _ in ()).throw(AssertionError("full pass")))
    append_metrics(tmp_path, {**_rows()[0], "round": 201})
    labels = run_log.run_site_labels(tmp_path)
    assert seen == [1] and labels == expected
    assert len(read_metrics(tmp_path)) == 201
