"""`fedrad tensorboard RUN_DIR`: TensorBoard event files beside metrics.jsonl, for operators who look there.

On request only (the extra `fedrad[tensorboard]`): the run itself writes metrics.jsonl, and this exporter turns
its lines into scalars in `RUN_DIR/tensorboard/` (`tensorboard --logdir RUN_DIR/tensorboard`): the round's
numbers as `round/<metric>` and each site's as `site/<name>/<metric>`, by the sites' enrolled names, with the
round as the step. It reads metrics.jsonl incrementally (fedrad.server.run_watch); with --follow it keeps
exporting new rounds until the run's summary.json appears. Each export starts the folder afresh, so a resumed
run's redone rounds are not shown twice.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedrad.server.run_log import site_labels
from fedrad.server.run_watch import SITE_SERIES, MetricsTail

FOLDER = "tensorboard"
SKIP = {"round", "secagg", "aggregated"}  # flags, not measurements


def scalars(row: dict[str, Any], labels: dict[str, str]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl line."""
    out = {f"round/{k}": float(v) for k, v in row.items()
           if k not in SKIP and isinstance(v, int | float) and not isinstance(v, bool)}
    for node, record in (row.get("sites") or {}).items():
        if not isinstance(record, dict):
            continue
        name = labels.get(str(node), str(node)).replace("/", "_")
        out.update({f"site/{name}/{k}": float(record[k]) for k in SITE_SERIES
                    if isinstance(record.get(k), int | float) and not isinstance(record.get(k), bool)})
    return out


def export(run_dir: Path, follow: bool = False, poll_seconds: float = 5.0) -> int:
    """Write the run's rounds as event files; returns the number of rounds written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError:
        raise FileNotFoundError("fedrad tensorboard needs the `tensorboard` package: pip install "
                                "'fedrad[tensorboard]'") from None
    out = run_dir / FOLDER
    shutil.rmtree(out, ignore_errors=True)
    tail = MetricsTail(run_dir / "metrics.jsonl")
    written: set[int] = set()
    with SummaryWriter(str(out)) as writer:
        while True:
            tail.poll()
            labels = site_labels(tail.rows)
            for row in tail.rows:
                rnd = int(row["round"])
                if rnd in written:
                    continue
                for tag, value in scalars(row, labels).items():
                    writer.add_scalar(tag, value, global_step=rnd)
                written.add(rnd)
            writer.flush()
            if not follow or (run_dir / "summary.json").exists():
                return len(written)
            time.sleep(poll_seconds)


def tensorboard_main(run_dir: str | os.PathLike[str], *, follow: bool = False) -> int:
    """`fedrad tensorboard RUN_DIR [--follow]`: export the run's metrics as event files; returns 0."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a fedrad run directory (no run.json)")
    n = export(run_dir, follow=follow)
    print(f"fedrad tensorboard: {n} rounds in {run_dir / FOLDER} (tensorboard --logdir {run_dir / FOLDER})",
          file=sys.stderr)
    return 0


__all__ = ["export", "scalars", "tensorboard_main"]
