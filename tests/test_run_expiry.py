"""A signed run's not-after bounds its START, not its length (issue 26): a weeks-long run is not cut off mid-way.

The site refuses to start (bind the nonce of) a run whose statement expired (StatementExpired -> RUN_EXPIRED);
a run it accepted before then is served on, its binding refreshed at most hourly so it is never pruned.
The check at the runtime's level (check_claims with a real signature) is in test_site_trust.py."""

from __future__ import annotations

import json

import pytest

from fedrad.client.site.site_state import NONCE_KEEP_SECONDS, SiteState, StatementExpired, bind_nonce
from fedrad.common.run_signature import RunClaims, expiry_problem

T0 = 2_000_000_000
NONCE_A, NONCE_B, NONCE_C = "a" * 32, "b" * 32, "c" * 32


def _state(tmp_path) -> SiteState:
    return SiteState(root=tmp_path / "state", audit_dir=tmp_path / "state" / "audit")


def test_expiry_problem_bounds_the_start():
    claims = RunClaims(NONCE_A, T0, ("train",))
    assert expiry_problem(claims, now=T0) is None
    rule, why = expiry_problem(claims, now=T0 + 1)
    assert rule == "run_expiry" and "had to start by" in why


def test_a_run_accepted_before_expiry_goes_on_and_a_new_one_after_it_is_refused(tmp_path):
    state = _state(tmp_path)
    assert bind_nonce(state, NONCE_A, 7, not_after=T0, now=T0 - 60) is None  # started in time
    for days in (0.5, 3, 45, 120):  # served on after its not-after, for months, each round
        assert bind_nonce(state, NONCE_A, 7, not_after=T0, now=T0 + days * 86_400) is None
    assert bind_nonce(state, NONCE_A, 8, not_after=T0, now=T0 + 86_400) == 7  # a replay stays a replay
    with pytest.raises(StatementExpired) as exc:  # another run under an expired statement: never starts
        bind_nonce(state, NONCE_B, 9, not_after=T0, now=T0 + 1)
    assert exc.value.rule == "run_expiry"
    assert NONCE_B not in state.nonces.read_text()


def test_the_binding_is_refreshed_hourly_and_kept_while_the_run_lasts(tmp_path):
    state = _state(tmp_path)
    bind_nonce(state, NONCE_A, 7, not_after=T0, now=T0 - 10)
    before = state.nonces.read_bytes()
    bind_nonce(state, NONCE_A, 7, not_after=T0, now=T0 + 1800)  # within the hour: nothing written
    assert state.nonces.read_bytes() == before
    late = T0 + NONCE_KEEP_SECONDS + 5 * 86_400
    bind_nonce(state, NONCE_A, 7, not_after=T0, now=late - 3600)  # the run still runs: refreshed
    entry = json.loads(state.nonces.read_text())["nonces"][NONCE_A]
    assert entry["last_used_time"] == late - 3600 and entry["run_id"] == 7
    bind_nonce(state, NONCE_C, 11, not_after=late + 86_400, now=late)  # pruning on another bind keeps A
    nonces = json.loads(state.nonces.read_text())["nonces"]
    assert set(nonces) == {NONCE_A, NONCE_C}
    much_later = late + NONCE_KEEP_SECONDS + 86_400 * 2  # A unused for over a month after its not-after: dropped
    bind_nonce(state, NONCE_B, 12, not_after=much_later + 60, now=much_later)
    assert NONCE_A not in json.loads(state.nonces.read_text())["nonces"]
