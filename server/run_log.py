"""The run directory's human side: `metrics.jsonl` (one line per round) and PNG plots refreshed each round."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedrad.common.atomic import atomic_write
from fedrad.common.protocol import MONITOR, PLOT, metrics_for

TRAIN_LOSS = "train_loss"  # SiteReport fields the plots name
EPSILON = "dp_epsilon"
_AUC_LABELS = {"knn_auc": "k-NN AUC (weighted mean)", "probe_auc": "linear-probe AUC (weighted mean)"}


def append_metrics(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one round's record. A resumed run first drops lines for rounds it is about to redo."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()


class SiteOrder:
    """The sites seen so far: enrolled names (a round's `site_names`) and node ids in order of first appearance.
    `labels()` is `site_labels` of every row added, at a cost of the number of sites, not of rounds."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.order: dict[str, None] = {}  # insertion-ordered set

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.names.update({str(k): str(v) for k, v in (row.get("site_names") or {}).items()})
            for node in (row.get("sites") or {}):
                self.order.setdefault(str(node), None)

    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        unnamed = 0
        for node in self.order:
            if node not in self.names:
                unnamed += 1
            labels[node] = self.names.get(node) or f"site {unnamed}"
        return labels


# The coordinator's own run (follow_metrics): path -> (inode, bytes parsed, rows, sites seen), so each round
# parses only the lines appended since its last read instead of the whole file (a weeks-long run has 10^4+
# lines), and names its sites without a pass over every row.
_FOLLOWED: dict[Path, tuple[int, int, list[dict[str, Any]], SiteOrder]] = {}


def follow_metrics(run_dir: Path) -> None:
    """From now on read_metrics(run_dir) in this process parses only what was appended since its last call
    (a replaced or truncated file, e.g. by truncate_metrics, is read again from the start)."""
    _FOLLOWED[Path(run_dir) / "metrics.jsonl"] = (-1, 0, [], SiteOrder())


def _parse(lines: list[str], rows: list[dict[str, Any]]) -> None:
    for line in lines:
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the round is redone on resume


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    if path not in _FOLLOWED:
        rows: list[dict[str, Any]] = []
        _parse(path.read_text(encoding="utf-8").splitlines(), rows)
        return rows
    inode, offset, rows, sites = _FOLLOWED[path]
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_ino != inode or st.st_size < offset:
            offset, rows, sites = 0, [], SiteOrder()
        fh.seek(offset)
        chunk = fh.read()
    whole = chunk.rfind(b"\n") + 1  # a line still being written is parsed once it is complete
    new: list[dict[str, Any]] = []
    _parse(chunk[:whole].decode("utf-8").splitlines(), new)
    rows.extend(new)
    sites.add(new)
    _FOLLOWED[path] = (st.st_ino, offset + whole, rows, sites)
    return list(rows)


def run_site_labels(run_dir: Path, pending: dict[str, Any] | None = None) -> dict[str, str]:
    """`site_labels` of the run's metrics (plus a `pending` row): for a followed run from the sites seen so far,
    so a round's cost does not grow with the rounds before it."""
    path = Path(run_dir) / "metrics.jsonl"
    if path not in _FOLLOWED:
        return site_labels(read_metrics(run_dir) + ([pending] if pending else []))
    read_metrics(run_dir)
    if not pending:
        return _FOLLOWED[path][3].labels()
    sites = SiteOrder()
    followed = _FOLLOWED[path][3]
    sites.names, sites.order = dict(followed.names), dict(followed.order)
    sites.add([pending])
    return sites.labels()


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Keep only rounds <= last_round (used on resume so a crashed round is not counted twice)."""
    rows = [r for r in read_metrics(run_dir) if int(r.get("round", 0)) <= last_round]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(Path(run_dir) / "metrics.jsonl", lambda p: p.write_text(text, encoding="utf-8"))


def site_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Flower node id -> the site's enrolled name (a round's `site_names`, see fedrad.server.site_names), else
    "site N", numbered in order of first appearance (round by round).

    Only numbers cross the wire (common/protocol.py), so a site never sends its name: names come from the
    operator's enrolment. 19-digit node ids read as noise on a plot; metrics.jsonl keeps them to match a site.
    """
    sites = SiteOrder()
    sites.add(sorted(rows, key=lambda r: int(r.get("round", 0))))
    return sites.labels()


def plot_run(run_dir: Path, pending: dict[str, Any] | None = None) -> Path | None:
    """The protocol's plotted metrics per round, train loss per site, the representation monitor's AUCs (when
    the run has probe-monitor on) and, when DP is on, epsilon, as one PNG.
    `pending`: a round's line not yet appended (the round plots before its checkpoint, appends after)."""
    rows = thin_rows(read_metrics(run_dir) + ([pending] if pending else []))
    if not rows:
        return None
    labels = run_site_labels(run_dir, pending)  # of every round, not only the plotted ones
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = run_figure(rows, labels)
    out = Path(run_dir) / "plots" / "loss.png"
    atomic_write(out, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return out


PLOT_POINTS = 200  # rounds drawn per line: a 10^4-round run redraws as fast as a 200-round one
# a run's plot is redrawn after a round at most this often (and once at the end): a draw takes ~0.23 CPU s in the
# ServerApp between two rounds, ~10 % of the demo's per-round overhead when rounds last seconds (issue 26)
PLOT_EVERY_S = 20.0


def thin_rows(rows: list[dict[str, Any]], points: int = PLOT_POINTS) -> list[dict[str, Any]]:
    """At most about `points` rows, evenly spaced by position, the first and the last always kept: the plot
    that is redrawn every round costs the same at round 10^4 as at round 200 (metrics.jsonl keeps every round)."""
    if len(rows) <= points:
        return rows
    step = -(-len(rows) // points)
    kept = rows[::step]
    return kept if kept[-1] is rows[-1] else [*kept, rows[-1]]


def run_figure(rows: list[dict[str, Any]], labels: dict[str, str] | None = None):
    """The figure `plot_run` saves: rounds on integer ticks, sites as "site N" (see `site_labels`; `labels`:
    those of the whole run when `rows` are thinned)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    # Round-level lines: every metric the protocol marks for plotting, ε in a panel of its own.
    lines = [k for k in metrics_for(PLOT) if k != EPSILON and any(r.get(k) is not None for r in rows)]
    has_eps = any(r.get(EPSILON) is not None for r in rows)
    aucs = [k for k in metrics_for(MONITOR) if any(r.get(k) is not None for r in rows)]
    panels = 2 + bool(aucs) + has_eps
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    for key in lines:
        ax.plot(rounds, [r.get(key) for r in rows], "o-", label=f"{key} (weighted mean)")
    ax.set(title="per round", xlabel="round", ylabel="value")
    if lines:
        ax.legend()
    if aucs:  # the representation monitor: AUCs on the sites' labelled images (client/app/probe_monitor.py)
        ax = axes[1]
        for key in aucs:
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_AUC_LABELS.get(key, key))
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title="representation quality (sites' labelled images)", xlabel="round", ylabel="AUC",
               ylim=(0.0, 1.0))
        ax.legend(fontsize=7)
    ax = axes[1 + bool(aucs)]
    labels = {**site_labels(rows), **(labels or {})}
    sites: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for node, m in (r.get("sites") or {}).items():
            if m.get(TRAIN_LOSS) is not None:
                sites.setdefault(str(node), []).append((r["round"], m[TRAIN_LOSS]))
    for node in sorted(sites, key=lambda n: list(labels).index(n)):
        pts = sites[node]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=labels[node])
    ax.set(title="train loss per site", xlabel="round", ylabel="loss")
    if sites:
        ax.legend(fontsize=7)
    if has_eps:
        ax = axes[-1]
        ax.plot(rounds, [r.get(EPSILON) for r in rows], "o-", color="crimson")
        ax.set(title="privacy spent (epsilon)", xlabel="round", ylabel="epsilon")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
