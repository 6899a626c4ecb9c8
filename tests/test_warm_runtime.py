"""The warm site runtime on real processes: one worker per run, replaced when killed, retired by the next run.

The unit part (no processes) checks the verdict cache keys and the worker pool's routing with stand-in
worker commands; the slow part runs two signed runs on a real SuperLink and two sites.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from federation_harness import wait_for

from fedrad.client.runtime.site_runtime import SiteTrust, VerdictCache, WorkerPool

WORKER_STARTED = re.compile(r"warm worker (\d+) started for run (\d+)")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- no processes of Flower -----------------------------------------------------------------------------


def test_verdict_cache_rechecks_when_fab_config_or_key_changes(tmp_path, monkeypatch):
    """A cached verdict is reused only for the same FAB bytes, run-config and key file contents."""
    import fedrad.client.runtime.site_trust as site_trust

    key = tmp_path / "consortium.pub"
    key.write_text("key one")
    calls: list[tuple] = []
    monkeypatch.setattr(site_trust, "check_run", lambda trust, fab, cfg: calls.append((fab, dict(cfg))) or None)
    cache, trust = VerdictCache(), SiteTrust(consortium_key=key)
    for _ in range(3):
        assert cache.check(trust, b"fab", {"lr": 0.1}) is None
    assert len(calls) == 1
    cache.check(trust, b"fab2", {"lr": 0.1})
    cache.check(trust, b"fab", {"lr": 0.2})
    key.write_text("key two")  # a key replaced on disk
    cache.check(trust, b"fab", {"lr": 0.1})
    assert len(calls) == 4
    key.unlink()  # unreadable: checked every time, never cached
    cache.check(trust, b"fab", {"lr": 0.1})
    cache.check(trust, b"fab", {"lr": 0.1})
    assert len(calls) == 6


def _echo_worker(out: Path) -> list[str]:
    """A stand-in worker: appends '<run id> <token>' per line it reads, as a real worker handles tokens."""
    code = ("import sys; rid = sys.argv[sys.argv.index('--run-id') + 1]\n"
            "for line in sys.stdin:\n"
            f"    open({str(out)!r}, 'a').write(rid + ' ' + line)\n")
    return [sys.executable, "-c", code]


def test_worker_pool_routes_by_run_replaces_the_dead_and_retires_the_previous_run(tmp_path):
    out = tmp_path / "handled.txt"
    pool = WorkerPool(_echo_worker(out), idle_seconds=60, max_alive=2)
    try:
        pool.hand(1, "a")
        pool.hand(1, "b")
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 10, "2 handled tokens")
        first = pool.active[1].proc
        first.kill()
        first.wait()
        pool.hand(1, "c")  # the run's worker died: a new one takes the message
        assert pool.active[1].proc is not first
        second = pool.active[1].proc
        pool.hand(2, "d")  # a new run: its own worker; run 1's is retired (its pipe closed, it exits)
        assert set(pool.active) == {2}
        second.wait(timeout=10)
        assert second.returncode == 0
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 4, 10, "4 handled tokens")
        assert sorted(out.read_text().splitlines()) == ["1 a", "1 b", "1 c", "2 d"]
        pool.idle_seconds = 0.0
        time.sleep(0.05)
        pool.tick()  # idle: retired
        assert not pool.active
        pool.retiring[-1].proc.wait(timeout=10)
    finally:
        for proc in pool.processes():
            proc.kill()
            proc.wait()


# --- real processes ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_is_replaced_and_each_run_gets_its_own_worker(tmp_path):
    """Run 1 (eval-in-train): SIGKILL one site's worker mid-run; a fresh worker takes the run's next message and
    the run completes with the site back. Run 2: every site starts a new worker for it, and run 1's exit."""
    import os
    import signal

    from federation_harness import Consortium

    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    sites = write_synthetic_sites(tmp_path / "sites", n_sites=2, patients_per_site=6, images_per_patient=(1, 3),
                                  size=64, seed=1)
    c = Consortium(tmp_path)
    try:
        c.start_link()
        for i, site in enumerate(sites):
            c.start_node(f"s{i}", site)
        logs = {name: tmp_path / "logs" / f"node-{name}.log" for name in ("s0", "s1")}

        def workers(name: str) -> list[tuple[int, int]]:
            text = logs[name].read_text(errors="replace") if logs[name].exists() else ""
            return [(int(pid), int(run)) for pid, run in WORKER_STARTED.findall(text)]

        run1 = tmp_path / "run1"
        result: dict[str, int] = {}
        runner = threading.Thread(target=lambda: result.setdefault("code", c.run(
            {"num-server-rounds": 3, "objective": "simclr", "run-dir": str(run1), "min-train-nodes": 1,
             "round-timeout": 120.0, "local-steps": 20, "eval-in-train": True})))
        runner.start()
        wait_for(lambda: bool(read_metrics(run1)), 300, "round 1 of run 1")
        (victim, run_id), = workers("s1")
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=600)
        assert result.get("code") == 0
        rows = read_metrics(run1)
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert rows[-1]["sites_aggregated"] == 2, "the site whose worker was killed should take part again"
        s1_workers = workers("s1")
        assert len(s1_workers) == 2 and {run for _, run in s1_workers} == {run_id}
        # eval-in-train: no evaluate message, the held-out metrics came with the train replies
        assert all(np.isfinite(r["eval_loss"]) for r in rows)
        assert all("eval_loss" in site for site in rows[-1]["sites"].values())
        assert "Receiving: evaluate" not in logs["s0"].read_text(errors="replace")

        run2 = tmp_path / "run2"
        assert c.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run2)}) == 0
        (row,) = read_metrics(run2)
        assert row["sites_aggregated"] == 2 and np.isfinite(row["eval_loss"])
        for name in ("s0", "s1"):
            started = workers(name)
            assert len({run for _, run in started}) == 2, started  # a worker of its own for run 2
            old = [pid for pid, run in started if run == run_id]
            wait_for(lambda old=old: not any(_alive(pid) for pid in old), 30, "run 1's workers to leave")
    finally:
        c.stop()


def test_resident_model_is_reused_within_a_run_and_loaded_with_each_message():
    """The warm worker's model: the same object for the same run and architecture, holding exactly the weights
    of each message; another run or dp=sample gets a new one."""
    from types import SimpleNamespace

    import torch
    from flwr.app import RecordDict

    from fedrad.client.app import task
    from fedrad.common.models import build_model
    from fedrad.common.packing import pack
    from fedrad.common.run_config import RunConfig

    cfg = RunConfig(model="test_resnet", objective="simclr", image_size=32, proj_dim=32)

    def message(seed: int):  # what _model_from reads of a Message: its content's arrays
        torch.manual_seed(seed)
        state = build_model("test_resnet", "simclr", 32, proj_dim=32).state_dict()
        return SimpleNamespace(content=RecordDict({"arrays": pack(state)})), state

    task._RESIDENT.clear()
    m1, s1 = message(1)
    m2, s2 = message(2)
    a, _, _ = task._model_from(m1, cfg, run_id=7)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in s1.items())
    b, _, _ = task._model_from(m2, cfg, run_id=7)
    assert b is a and all(torch.equal(b.state_dict()[k], v) for k, v in s2.items())
    assert task._model_from(m1, cfg, run_id=8)[0] is not a  # another run: its own model
    dp_cfg = RunConfig(model="test_resnet", objective="simsiam", image_size=32, proj_dim=32, dp="sample",
                       dp_noise=1.0)
    m3 = SimpleNamespace(content=RecordDict({"arrays": pack(  # a GroupNorm model's arrays
        build_model("test_resnet", "simsiam", 32, proj_dim=32, norm="group").state_dict())}))
    assert task._model_from(m3, dp_cfg, run_id=8)[0] is not task._model_from(m3, dp_cfg, run_id=8)[0]
    task._RESIDENT.clear()


def test_eval_in_train_sends_no_evaluate_message_and_train_replies_may_carry_held_out_metrics(tmp_path):
    from fedrad.common.protocol import MESSAGE_TRAIN, SiteReport
    from fedrad.common.run_config import RunConfig
    from fedrad.server.exchange import RoundTimes
    from fedrad.server.rounds import RunState, _evaluate
    from fedrad.server.strategies import build_strategy

    class NoGrid:
        def get_node_ids(self):
            return [1, 2]

        def push_messages(self, messages):
            raise AssertionError("nothing may be sent")

    cfg = RunConfig(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=1.0, eval_in_train=True)
    assert RunConfig.from_flower({"eval-in-train": "true"}).eval_in_train
    state = RunState(NoGrid(), cfg, tmp_path, build_strategy(cfg), "k", ["w"])
    assert _evaluate(state, 1, None, RoundTimes()) == ({}, {})
    report = SiteReport.from_metrics({"num_examples": 4, "train_loss": 1.0, "eval_loss": 0.5, "alignment": 0.1,
                                      "uniformity": -1.0, "eval_examples": 2}, MESSAGE_TRAIN)
    assert report.eval_loss == 0.5 and report.eval_examples == 2


def test_short_pull_backoffs_reach_flowers_pullers():
    """The ServerApp's reply puller and the runtime's message puller use the short backoff (fails loudly if a
    Flower upgrade renames what they wrap)."""
    import inspect

    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.superlink.grid import http_grid

    from fedrad.client.runtime.site_runtime import PULL_BACKOFF
    from fedrad.server.exchange import REPLY_PULL_BACKOFF, short_reply_backoff

    assert short_reply_backoff() and short_reply_backoff()
    assert http_grid.pull_objects.keywords == {"initial_backoff": REPLY_PULL_BACKOFF[0],
                                               "backoff_cap": REPLY_PULL_BACKOFF[1]}
    assert not hasattr(http_grid.pull_objects.func, "fedrad_short_backoff")  # wrapped once, not twice
    params = inspect.signature(pull_and_inflate_object_from_tree).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(params) and PULL_BACKOFF[0] < PULL_BACKOFF[1] <= 1.0
