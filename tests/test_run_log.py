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
