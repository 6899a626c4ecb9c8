"""Everything that holds identifiers (paths, SOP UIDs, ages, patient keys, run ids) is 0600 in 0700 folders,
whatever the umask: the decoded-image cache and its index, the PACS instance store and listing, the state
folder and its files (state.json, ledger, rounds, nonces, runs joined), and the audit logs (also an older 0644 one)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.app.error_reply import audit_refusal
from fedrad.client.site.budget import SiteBudget
from fedrad.client.site.release_store import record_participation
from fedrad.client.site.site_state import SiteState, bind_nonce, count_activity, open_state
from fedrad.common.atomic import append_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # the usual default: without care every file is 0644, every folder 0755
    yield
    os.umask(old)


def _decoder(path: str):
    return np.zeros((8, 8), np.float32), {"age": 42, "patient_key": "k"}


def test_state_ledger_audit_and_joined_runs_are_private(tmp_path, open_umask):
    state = SiteState(tmp_path / "state", tmp_path / "state" / "audit")
    state.root.mkdir(mode=0o755)  # made by an older fedrad or by hand: tightened when opened
    open_state(state)
    assert _mode(state.root) == 0o700 and _mode(state.marker) == 0o600
    budget = SiteBudget(state, 1e-5)
    planned = budget.plan([(1.0, 0.01, 10)], flower_run_id=1, message_id="m1", statement="s")
    budget.record(planned.entry_id, [(1.0, 0.01, 10)])
    count_activity(state, {"train": 0})
    bind_nonce(state, "nonce", 1, 2_000_000_000)
    record_participation(state, 7, "key")
    audit_refusal(state, {"rule": "rule", "detail": "detail naming /data/patient/img.dcm",
                          "reply": {"error_code": 4001}})
    for path in (state.ledger, state.activity, state.nonces, state.root / "runs_joined.json", state.refusals):
        assert _mode(path) == 0o600, path
    assert _mode(state.audit_dir) == 0o700
    legacy = tmp_path / "audit" / "outgoing.jsonl"  # an audit file an older fedrad left world-readable
    legacy.parent.mkdir()
    legacy.write_text("{}\n")
    legacy.chmod(0o644)
    append_private(legacy, json.dumps({"x": 1}) + "\n")
    assert _mode(legacy) == 0o600 and legacy.read_text().count("\n") == 2


def test_decoded_cache_index_and_pacs_store_are_private(tmp_path, open_umask):
    from fedrad.common.cache import DecodedCache
    from fedrad.common.sources.pacs import InstanceStore

    cache = DecodedCache(tmp_path / "cache", 8, decoder=_decoder, workers=0, state_dir=tmp_path / "state")
    assert _mode(cache.dir) == 0o700 and _mode(cache.root) == 0o700 and _mode(cache.index_path) == 0o600
    cache.close()
    store = InstanceStore(tmp_path / "pacs")
    store.put("1.2.3", b"DICM")
    assert _mode(store.root) == 0o700 and _mode(store.path("1.2.3")) == 0o600
