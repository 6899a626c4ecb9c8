"""The site's ε ledger cannot forget rounds, and every data-touching message is metered (issue 25, items 1, 3).

In-process, with the site's own functions in the order the site calls them: the site policy mod, then the
real train / evaluate handlers on a real synthetic DICOM site, real DP-SGD (opacus) under dp = "sample".
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from federation_harness import TINY_RUN
from test_site_policy import _assert_fixed_reply, _context, _dp_run, _message, _refusals

from fedrad.client.site.site_state import state_paths
from fedrad.client.training.sample_dp import epsilon_of
from fedrad.common.protocol import ErrorCode
from fedrad.common.run_config import RunConfig


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("budget-site")
    (site,) = write_synthetic_sites(root, n_sites=1, patients_per_site=8, images_per_patient=(1, 2), size=48, seed=4)
    return site


def _ledger_steps(path) -> list[tuple[float, float, int]]:
    """Every (σ, q, steps) the ledger file holds, whatever its layout (entries, or the older per-run-key table)."""
    data = json.loads(path.read_text())
    histories = [e["history"] for e in data.get("entries", {}).values()]
    histories += [r["history"] for r in data.get("runs", {}).values()]
    return [(float(s), float(q), int(n)) for history in histories for s, q, n in history]


def test_two_runs_in_flight_with_one_run_key_keep_every_round(tmp_path, site, monkeypatch):
    """Two Flower runs (ids 7 and 8) send train messages with the SAME run-key, their rounds in flight together
    (both planned before either is recorded, as with a retired worker, a fresh process per message or a
    replay): the ledger holds every trained round and the site's ε is that of all of them."""
    from fedrad.client.app.policy_mod import site_policy_mod
    from fedrad.client.app.task import handle_train
    from fedrad.client.training import trainer

    policy = tmp_path / "site.toml"
    policy.write_text("[privacy]\nepsilon_budget = 0\n")
    barrier = threading.Barrier(2, timeout=600)
    real_train = trainer.train_local

    def in_flight(*args, **kwargs):  # the real DP-SGD, entered only once both messages are planned
        barrier.wait()
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_local", in_flight)
    rounds = 3
    replies: dict[int, list] = {7: [], 8: []}
    errors: list[BaseException] = []

    def run(run_id: int) -> None:
        try:
            for rnd in range(1, rounds + 1):
                ctx = _context(tmp_path, site, _dp_run(), str(policy))
                ctx.run_id = run_id
                msg = _message(RunConfig.from_flower(_dp_run()), run_key="same-key", server_round=rnd)
                replies[run_id].append(site_policy_mod(msg, ctx, handle_train))
        except BaseException as exc:  # reported by the main thread
            barrier.abort()
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in replies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(not r.has_error() for rs in replies.values() for r in rs)
    ledger = state_paths(_context(tmp_path, site, {}).node_config).ledger
    steps = _ledger_steps(ledger)
    assert sum(n for _, _, n in steps) == 2 * rounds * 2  # 2 runs x 3 rounds x 2 local steps: none forgotten
    ((sigma, q),) = {(s, q) for s, q, _ in steps}
    true_eps = epsilon_of([(sigma, q, 2 * rounds * 2)], 1e-5)
    assert json.loads(ledger.read_text())["site_epsilon"] == pytest.approx(true_eps, rel=1e-6)
    last = max(r.content["metrics"]["dp_epsilon"] for rs in replies.values() for r in rs)
    assert last == pytest.approx(true_eps, rel=1e-6)  # the last reply states the site's whole ε
    entries = json.loads(ledger.read_text()).get("entries", {})
    assert sorted((e["flower_run_id"], e["server_round"]) for e in entries.values()) == sorted(
        (run_id, rnd) for run_id in replies for rnd in range(1, rounds + 1))
    assert ledger.stat().st_mode & 0o777 == 0o600


def _evaluate_message(cfg: RunConfig):
    """An evaluate message carrying the model's weights, as the coordinator sends it."""
    from flwr.app import Message
    from flwr.app.message_type import MessageType

    train = _message(cfg)
    return Message(content=train.content, dst_node_id=1, message_type=MessageType.EVALUATE)


def test_evaluates_over_the_daily_limit_are_refused(tmp_path, site):
    """max_evaluations_per_day = 2: two evaluate messages are answered by the real handler, the third is refused
    with a fixed code (rule audited at the site), training is metered on its own; a train message of an
    eval-in-train run is an evaluation too; under dp = "sample" evaluate is refused outright."""
    from fedrad.client.app.policy_mod import site_policy_mod
    from fedrad.client.app.task import handle_evaluate

    policy = tmp_path / "site.toml"
    policy.write_text("[training]\nmax_rounds_per_day = 10\nmax_evaluations_per_day = 2\n")
    cfg = RunConfig.from_flower(dict(TINY_RUN))
    ctx = _context(tmp_path, site, TINY_RUN, str(policy))
    for _ in range(2):
        reply = site_policy_mod(_evaluate_message(cfg), ctx, handle_evaluate)
        assert not reply.has_error() and reply.content["metrics"]["eval_examples"] > 0
    handled = []

    def handler(m, c):
        handled.append(m.metadata.message_type)
        return m

    reply = site_policy_mod(_evaluate_message(cfg), ctx, handler)
    _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
    assert _refusals(tmp_path)[-1]["rule"] == "max_evaluations_per_day" and not handled
    msg = _message(cfg)
    assert site_policy_mod(msg, ctx, handler) is msg  # training has its own limit
    in_train = dict(TINY_RUN, **{"eval-in-train": True})
    reply = site_policy_mod(_message(RunConfig.from_flower(in_train)), _context(tmp_path, site, in_train, str(policy)),
                            handler)
    _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
    assert _refusals(tmp_path)[-1]["rule"] == "max_evaluations_per_day" and handled == ["train"]
    activity = json.loads(state_paths(ctx.node_config).activity.read_text())
    assert len(activity["evaluate"]) == 2 and len(activity["train"]) == 1  # refused messages are not counted

    # dp = "sample": evaluate replies would carry un-noised held-out metrics; refused, whatever the limits
    policy.write_text("[training]\nmax_evaluations_per_day = 0\n")
    dp_ctx = _context(tmp_path, site, _dp_run(), str(policy))
    reply = site_policy_mod(_evaluate_message(RunConfig.from_flower(_dp_run())), dp_ctx, handler)
    _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
    assert _refusals(tmp_path)[-1]["rule"] == "dp_sample_evaluate" and handled == ["train"]


def test_run_key_is_bounded(tmp_path, site):
    """The coordinator's run-key is stored at the site (a ledger label): one longer than 64 characters, or not
    of [A-Za-z0-9._-], is refused before anything is stored."""
    from fedrad.client.app.policy_mod import site_policy_mod

    cfg = RunConfig.from_flower(dict(TINY_RUN))
    ctx = _context(tmp_path, site, TINY_RUN)
    for bad in ("k" * 65, "../x", "a b"):
        reply = site_policy_mod(_message(cfg, run_key=bad), ctx, lambda m, c: m)
        _assert_fixed_reply(reply, ErrorCode.PROTOCOL_MISMATCH)
        assert _refusals(tmp_path)[-1]["rule"] == "run_key"
    ok = _message(cfg, run_key="k" * 64)
    assert site_policy_mod(ok, ctx, lambda m, c: m) is ok
