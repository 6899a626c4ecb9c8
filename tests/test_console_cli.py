"""The operator's console on the command line: `fedrad runs --format json` with ISO times, `fedrad sites`,
`fedrad log`, and `fedrad run --detach` refusing what it cannot submit (in-process; the real run is in
tests/test_console_live.py)."""

from __future__ import annotations

import json

import pytest

from fedrad.deploy.cli import main
from fedrad.deploy.processes import free_port
from fedrad.deploy.runs_command import hms, iso_time, runs_json, runs_table, sites_rows, sites_table
from fedrad.server.run_log import append_metrics


def _run_dir(root, run_id, rows):
    folder = root / f"run-{run_id}"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "config": {"num-server-rounds": 3}}))
    for row in rows:
        append_metrics(folder, row)
    return folder


def test_elapsed_and_times_are_readable():
    assert hms(27.952228) == "0:00:28" and hms(3 * 3600 + 61) == "3:01:01" and hms(None) == "-"
    assert iso_time("2026-12-06 07:04:46Z") == "2026-12-06T07:04:46Z"
    assert iso_time("2026-12-06T07:04:46+01:00") == "2026-12-06T06:04:46Z"
    assert iso_time("N/A") is None and iso_time("") is None and iso_time("yesterday") is None


def test_runs_json_joins_flower_and_run_directories(tmp_path):
    folder = _run_dir(tmp_path, 7, [{"round": 1, "train_loss": 3.5, "eval_loss": 3.25}])
    runs = [{"run-id": "7", "status": "running", "elapsed": 27.952228, "pending-at": "2026-12-06 07:04:46Z",
             "starting-at": "2026-12-06 07:04:47Z", "running-at": "2026-12-06 07:04:48Z", "finished-at": "N/A"}]
    out = runs_json(runs, {"7": folder})
    assert out == [{"run_id": "7", "status": "running", "round": 1, "rounds_planned": 3, "train_loss": 3.5,
                    "eval_loss": 3.25, "elapsed_seconds": 27.952228, "pending_at": "2026-12-06T07:04:46Z",
                    "starting_at": "2026-12-06T07:04:47Z", "running_at": "2026-12-06T07:04:48Z",
                    "finished_at": None, "run_dir": str(folder)}]
    assert "0:00:28" in runs_table(runs, {"7": folder}).splitlines()[1]


def test_sites_join_flower_nodes_with_names_images_and_rejections(tmp_path):
    _run_dir(tmp_path, 1, [
        {"round": 1, "site_names": {"11": "hannover"}, "sites": {"11": {"num_examples": 40}, "22": {}},
         "rejected": {"22": "norm_outlier"}},
        {"round": 2, "sites": {"11": {"num_examples": 41}}, "rejected": {"22": "norm_outlier"}}])
    nodes = [{"node-id": "11", "status": "online", "created-at": "2026-12-06 07:00:00Z",
              "online-at": "2026-12-06 07:01:00Z", "offline-at": "N/A"},
             {"node-id": "22", "status": "offline", "created-at": "2026-12-06 07:00:00Z",
              "online-at": "2026-12-06 07:01:00Z", "offline-at": "2026-12-06 08:00:00Z"}]
    rows = sites_rows(nodes, tmp_path)
    assert rows[0]["name"] == "hannover" and rows[0]["connected"] and rows[0]["images_reported"] == 41
    assert rows[0]["last_seen"] == "now" and rows[0]["enrolled_at"] == "2026-12-06T07:00:00Z"
    assert rows[1]["name"] is None and not rows[1]["connected"] and rows[1]["last_seen"] == "2026-12-06T08:00:00Z"
    assert rows[1]["rejected"] == {"norm_outlier": 2}
    table = sites_table(rows).splitlines()
    assert table[0].split()[:3] == ["SITE", "NODE", "ID"] and table[1].startswith("hannover")
    assert "norm_outlier x2" in table[2]


@pytest.mark.parametrize("command", [["log", "12", "--follow"], ["sites"],
                                     ["runs", "--format", "json"]])
def test_console_commands_against_a_stopped_coordinator_say_why_in_one_line(command, tmp_path, capsys):
    assert main([*command, "--superlink", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unavailable" in err[0] and "Traceback" not in err[0], err


def test_log_refuses_a_run_id_that_is_not_a_number(capsys):
    assert main(["log", "abc", "--superlink", f"127.0.0.1:{free_port()}"]) == 2
    assert "not a Flower run id" in capsys.readouterr().err


def test_detached_run_to_a_stopped_coordinator_fails_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--detach", "--superlink", f"127.0.0.1:{free_port()}", "--run-dir", str(run_dir),
                 "-c", "num-server-rounds=1"])
    captured = capsys.readouterr()
    assert code == 1
    err = [x for x in captured.err.strip().splitlines() if "unsigned run" not in x]
    assert len(err) == 1 and "did not accept the run" in err[0], captured
