"""`fedrad tensorboard RUN_DIR`: the run's rounds as TensorBoard scalars (read back with TensorBoard's own reader),
sites by name, the round as the step."""

from __future__ import annotations

import json

import pytest

from fedrad.deploy.cli import main
from fedrad.server.run_log import append_metrics


def test_rounds_become_scalars_read_back_by_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": 1, "config": {}}))
    for rnd in (1, 2):
        append_metrics(run_dir, {"round": rnd, "train_loss": 3.0 - rnd, "secagg": False, "sites_aggregated": 2,
                                 "site_names": {"11": "hannover"},
                                 "sites": {"11": {"train_loss": 2.5 - rnd, "num_examples": 40}}})
    assert main(["tensorboard", str(run_dir)]) == 0
    assert "2 rounds" in capsys.readouterr().err
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"round/train_loss", "round/sites_aggregated", "site/hannover/train_loss"} <= tags
    assert "round/secagg" not in tags
    assert [(e.step, e.value) for e in events.Scalars("round/train_loss")] == [(1, 2.0), (2, 1.0)]
    assert main(["tensorboard", str(run_dir)]) == 0  # again: the folder starts afresh, no duplicate steps
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("site/hannover/train_loss")] == [1, 2]


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert main(["tensorboard", str(tmp_path)]) == 2
    assert "not a fedrad run directory" in capsys.readouterr().err
