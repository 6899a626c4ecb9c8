"""`fedrad runs` and `fedrad stop RUN`: Flower's own run list and stop, joined with fedrad's run directories."""

from __future__ import annotations

import subprocess
import time

import pytest

from fedrad.deploy.cli import main
from fedrad.deploy.processes import free_port
from fedrad.deploy.runs_command import parse_run_id, progress, run_directories, runs_table
from fedrad.server.run_log import append_metrics


def _run_dir(root, run_id, rounds_planned, rows):
    """A run directory as the ServerApp leaves it: run.json, then one metrics.jsonl line per round."""
    import json

    folder = root / f"run-{run_id}"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "config": {"num-server-rounds": rounds_planned}}))
    for row in rows:
        append_metrics(folder, row)
    return folder


def test_runs_table_joins_flower_runs_with_run_directories(tmp_path):
    done = _run_dir(tmp_path, 111, 3, [{"round": 1, "train_loss": 3.5, "eval_loss": 3.1},
                                        {"round": 2, "train_loss": 2.25, "eval_loss": None}])
    _run_dir(tmp_path, 222, 5, [])
    (tmp_path / "not-a-run").mkdir()
    dirs = run_directories(tmp_path)
    assert dirs == {"111": done, "222": tmp_path / "run-222"}
    p = progress(done)
    assert (p.rounds_done, p.rounds_planned, p.train_loss, p.eval_loss) == (2, 3, 2.25, None)
    table = runs_table([{"run-id": "111", "status": "running", "elapsed": "00:01:00"},
                        {"run-id": "222", "status": "pending"},
                        {"run-id": "333", "status": "finished:completed"}], dirs).splitlines()
    assert table[0].split()[:3] == ["RUN", "STATUS", "ROUND"]
    assert table[1].split()[:5] == ["111", "running", "2/3", "2.2500", "-"] and str(done) in table[1]
    assert table[2].split()[:3] == ["222", "pending", "0/5"]
    assert table[3].split()[:3] == ["333", "finished:completed", "-"] and "not under --runs-dir" in table[3]


@pytest.mark.parametrize("text", ["abc", "-3", "0", "", "12x"])
def test_stop_refuses_a_run_id_that_is_not_a_number(text, capsys):
    with pytest.raises(ValueError, match="not a Flower run id"):
        parse_run_id(text)
    assert main(["stop", text, "--superlink", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedrad stop: error: RUN") and "Traceback" not in err[0]


def test_runs_against_a_stopped_coordinator_says_why_in_one_line(tmp_path, capsys):
    assert main(["runs", "--superlink", f"127.0.0.1:{free_port()}", "--runs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unavailable" in err[0], err


@pytest.mark.slow
def test_runs_and_stop_on_a_real_superlink(tmp_path, capsys):
    """A real SuperLink without nodes: a submitted run waits for sites; `fedrad runs` shows it with its run
    directory, `fedrad stop` stops it there, an unknown run id is bad input (exit 2)."""
    from fedrad.deploy.processes import ProcessGroup, app_dir, flower_env, superlink_command, tool, wait_for_port
    from fedrad.deploy.run_command import run_config_string, write_flwr_home

    port = free_port()
    address = f"127.0.0.1:{port}"
    runs_dir, run_dir = tmp_path / "runs", tmp_path / "runs" / "r1"
    (tmp_path / "state").mkdir()
    with ProcessGroup() as group:
        link = group.start("superlink", superlink_command(tmp_path / "state", "127.0.0.1", port),
                           tmp_path / "superlink.log")
        wait_for_port("127.0.0.1", port, 60, link)
        assert main(["runs", "--superlink", address, "--runs-dir", str(runs_dir)]) == 0
        assert "no runs on the coordinator" in capsys.readouterr().out
        home = write_flwr_home(tmp_path / "home", address)
        config = run_config_string({"num-server-rounds": 4, "run-dir": str(run_dir)}, app_dir())
        submitted = subprocess.run([tool("flwr"), "run", str(app_dir()), "fedrad", "--run-config", config],
                                   capture_output=True, text=True, env=flower_env({"FLWR_HOME": str(home)}),
                                   timeout=120)
        run_id = submitted.stdout.split("Successfully started run")[1].split()[0]
        deadline = time.time() + 60  # the ServerApp writes run.json once it has built the model
        while not (run_dir / "run.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert main(["runs", "--superlink", address, "--runs-dir", str(runs_dir)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(run_id))
        assert line.split()[1] == "running" and line.split()[2] == "0/4" and str(run_dir) in line, line

        assert main(["stop", "4242", "--superlink", address]) == 2
        assert "RUN 4242: no such run" in capsys.readouterr().err
        assert main(["stop", run_id, "--superlink", address]) == 0
        assert f"run {run_id} stopped" in capsys.readouterr().out
        assert main(["runs", "--superlink", address, "--runs-dir", str(runs_dir)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(run_id))
        assert "stopped" in line.split()[1], line
        assert main(["stop", run_id, "--superlink", address]) == 0
        assert "already finished" in capsys.readouterr().out
        # Re-attaching to the stopped run ends with its status: exit 1, not 0 (tests/test_console_live.py: 0).
        assert main(["log", run_id, "--follow", "--superlink", address]) == 1
        assert f"run {run_id} ended finished:stopped (exit 1)" in capsys.readouterr().err
