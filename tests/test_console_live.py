"""The operator's console against a real loopback consortium (SuperLink + two SuperNodes as real processes):
a run started with `fedrad run --detach` returns at once; `fedrad log RUN --follow`, a separate process,
re-attaches and ends with the run's exit status; `fedrad sites` lists both nodes connected; `fedrad runs
--format json` gives ISO times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from federation_harness import TINY_RUN, Consortium, wait_for

from fedrad.deploy.cli import main
from fedrad.deploy.processes import flower_env


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("sites")
    return write_synthetic_sites(root, n_sites=2, patients_per_site=4, images_per_patient=(1, 2), size=48, seed=3)


def tiny_run_args(rounds: int) -> list[str]:
    return [x for k, v in {**TINY_RUN, "num-server-rounds": rounds}.items() for x in ("-c", f"{k}={v}")]


@pytest.mark.slow
def test_detached_run_then_log_follow_reattaches_to_its_end(tmp_path, sites, capsys):
    consortium = Consortium(tmp_path)
    try:
        consortium.start_link()
        for i, site in enumerate(sites):
            consortium.start_node(f"s{i}", site)
        run_dir = tmp_path / "runs" / "r1"
        code = main(["run", "--detach", "--superlink", consortium.address, "--run-dir", str(run_dir),
                     "--sign-key", str(consortium.consortium_key), *tiny_run_args(2)])
        out = capsys.readouterr().out
        assert code == 0, out
        assert not (run_dir / "summary.json").exists()  # returned while the run goes on
        run_id = out.split("fedrad run: run ")[1].split()[0]
        assert f"fedrad log {run_id} --follow --superlink {consortium.address}" in out

        follow = subprocess.Popen([sys.executable, "-m", "fedrad.deploy.cli", "log", run_id, "--follow",
                                   "--superlink", consortium.address], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=flower_env())
        try:
            wait_for(lambda: len(_sites(consortium.address)) == 2, 120, "both nodes listed by `fedrad sites`")
            listed = _sites(consortium.address)
            assert all(s["connected"] and s["last_seen"] == "now" and s["enrolled_at"].endswith("Z")
                       for s in listed), listed
            stdout, stderr = follow.communicate(timeout=600)
        finally:
            if follow.poll() is None:
                follow.kill()
        assert follow.returncode == 0, stderr
        assert f"run {run_id} ended finished:completed (exit 0)" in stderr
        assert "[round 2/2]" in stdout and "run finished" in stdout, stdout[-2000:]
        assert (run_dir / "summary.json").exists()

        assert main(["runs", "--format", "json", "--superlink", consortium.address,
                     "--runs-dir", str(tmp_path / "runs")]) == 0
        runs = json.loads(capsys.readouterr().out)["runs"]
        run = next(r for r in runs if r["run_id"] == run_id)
        assert run["status"] == "finished:completed" and run["round"] == 2 and run["run_dir"] == str(run_dir)
        assert run["finished_at"].endswith("Z") and "T" in run["finished_at"] and run["elapsed_seconds"] > 0

        assert main(["log", run_id, "--superlink", consortium.address]) == 0  # the log once, no follow
        assert "fedrad" in capsys.readouterr().out
    finally:
        consortium.stop()


def _sites(address: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "fedrad.deploy.cli", "sites", "--format", "json", "--superlink",
                          address], capture_output=True, text=True, env=flower_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return [s for s in json.loads(out.stdout)["sites"] if s["status"] == "online"]
