"""Release distribution: the wire contract, the site's store (verify, rollback, nothing half-written), the site's
ClientApp answering release messages, and (slow) a real consortium publishing to three sites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from release_fixtures import bundle_files, two_releases

from fedrad.client.site.release_store import (
    JOINED_FILE,
    ReleaseRefused,
    bundle_folder,
    held_releases,
    judge_offer,
    record_participation,
    resolve_release,
    store_release,
)
from fedrad.client.site.site_state import SiteState
from fedrad.common.bundle import MANIFEST, SIGNATURE, WEIGHTS, verify_bundle
from fedrad.common.release_wire import (
    MODEL_CARD,
    RELEASE_CODE,
    TIMM_CONFIG,
    ReleaseCode,
    ReleaseWireError,
    join_chunks,
    release_id,
    reply_code,
    split_chunks,
)

LIMITS = {WEIGHTS: 1 << 20, MANIFEST: 1 << 20, SIGNATURE: 64, MODEL_CARD: 1 << 20, TIMM_CONFIG: 1 << 20}


# -- the wire contract ----------------------------------------------------------------------------------
def test_chunks_round_trip_and_refuse_what_breaks_the_contract():
    data = bytes(range(256)) * 41
    pieces = dict(split_chunks(WEIGHTS, data, chunk=1000))
    assert len(pieces) == 11 and join_chunks(pieces, LIMITS)[WEIGHTS] == data
    assert join_chunks(dict(split_chunks(SIGNATURE, b"")), LIMITS) == {SIGNATURE: b""}
    with pytest.raises(ReleaseWireError, match="not <allowed file>"):
        join_chunks({"../../etc/passwd/0": b"x"}, LIMITS)
    gap = dict(pieces)
    del gap[f"{WEIGHTS}/3"]
    with pytest.raises(ReleaseWireError, match="indices"):
        join_chunks(gap, LIMITS)
    with pytest.raises(ReleaseWireError, match="more than"):
        join_chunks(pieces, {**LIMITS, WEIGHTS: 100})


def test_reply_code_is_exactly_one_known_code():
    assert reply_code({RELEASE_CODE: 3}) is ReleaseCode.STORED
    for bad in ({RELEASE_CODE: 999}, {RELEASE_CODE: 1.5}, {RELEASE_CODE: True}, {RELEASE_CODE: 3, "x": 1}, {}):
        with pytest.raises(ReleaseWireError):
            reply_code(bad)
    assert release_id(7, "ab/cd-ef0123456789zz", 2) == "abcdef012345-2"
    assert release_id(1234, None, 1) == "1234-1"


# -- the site's store --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """Release #1 and #2 of one run, and the consortium key pair."""
    return two_releases(tmp_path_factory.mktemp("publish"))


def _state(tmp_path: Path) -> SiteState:
    return SiteState(root=tmp_path / "state", audit_dir=tmp_path / "audit")


def _leftovers(state: SiteState) -> list[str]:
    """What a refused store left in the state folder (its lock file aside)."""
    return sorted(p.name for p in state.root.iterdir() if p.name not in (".lock", JOINED_FILE)) \
        if state.root.exists() else []


def test_store_verifies_then_renames_and_lists(signed, tmp_path):
    first, _, _, pub = signed
    state = _state(tmp_path)
    with pytest.raises(ReleaseRefused) as refused:  # a run this site took no part in
        store_release(state, bundle_files(first), pub)
    assert refused.value.code == ReleaseCode.REFUSED_NOT_PARTICIPANT and _leftovers(state) == []
    record_participation(state, 1, None)
    assert store_release(state, bundle_files(first), pub) == (ReleaseCode.STORED, "1-1")
    assert store_release(state, bundle_files(first), pub) == (ReleaseCode.HAVE, "1-1")
    stored = resolve_release(state.root, "latest")
    assert stored == state.root / "releases" / "1-1" and verify_bundle(stored, pub)["release"]["sequence"] == 1
    assert sorted(p.name for p in stored.iterdir()) == sorted(bundle_files(first))
    assert _leftovers(state) == ["releases"]
    assert judge_offer(state, "1", "", 1, "2030-01-01T00:00:00Z", "1-1") == ReleaseCode.HAVE
    assert judge_offer(state, "1", "", 2, "2099-01-01T00:00:00Z", "1-2") == ReleaseCode.WANT
    assert judge_offer(state, "9", "", 1, "2099-01-01T00:00:00Z", "9-1") == ReleaseCode.REFUSED_NOT_PARTICIPANT
    assert judge_offer(state, "1", "", 1, "2000-01-01T00:00:00Z", "1-0") == ReleaseCode.REFUSED_ROLLBACK


@pytest.mark.parametrize("damage", ["weights", "manifest", "unsigned", "wrong_key", "card"])
def test_store_refuses_tampered_unsigned_or_foreign_and_leaves_nothing(signed, tmp_path, damage):
    from fedrad.server.release import generate_keys

    first, _, _, pub = signed
    state = _state(tmp_path)
    record_participation(state, 1, None)
    files = bundle_files(first)
    if damage == "weights":
        files[WEIGHTS] = files[WEIGHTS][:-1] + bytes([files[WEIGHTS][-1] ^ 1])
    elif damage == "manifest":
        files[MANIFEST] = files[MANIFEST].replace(b'"rounds": 2', b'"rounds": 9')
    elif damage == "unsigned":
        del files[SIGNATURE]
    elif damage == "wrong_key":
        pub = generate_keys(tmp_path / "other")[1]
    else:
        files[MODEL_CARD] = b"# a card the manifest does not name\n"
    with pytest.raises(ReleaseRefused) as refused:
        store_release(state, files, pub)
    assert refused.value.code == ReleaseCode.REFUSED_UNVERIFIED
    assert _leftovers(state) == [] and held_releases(state.root) == []


def test_store_refuses_rollback(signed, tmp_path):
    first, second, _, pub = signed
    state = _state(tmp_path)
    record_participation(state, 1, None)
    assert store_release(state, bundle_files(second), pub) == (ReleaseCode.STORED, "1-2")
    with pytest.raises(ReleaseRefused) as refused:
        store_release(state, bundle_files(first), pub)
    assert refused.value.code == ReleaseCode.REFUSED_ROLLBACK and "rollback refused" in str(refused.value)
    assert [h.release_id for h in held_releases(state.root)] == ["1-2"]


def test_store_is_all_or_nothing_when_the_rename_fails(signed, tmp_path, monkeypatch):
    """A crash between verification and the rename leaves no folder, hidden or not."""
    import fedrad.client.site.release_store as store

    first, _, _, pub = signed
    state = _state(tmp_path)
    record_participation(state, 1, None)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "rename", full_disk)
    with pytest.raises(OSError):
        store_release(state, bundle_files(first), pub)
    assert [p.name for p in (state.root / "releases").iterdir()] == []
    assert not [p for p in state.root.iterdir() if p.name.startswith(".incoming-")]


def test_release_argument_resolution(signed, tmp_path):
    first, _, _, pub = signed
    state = _state(tmp_path)
    with pytest.raises(FileNotFoundError, match="no release"):
        resolve_release(state.root, "latest")
    record_participation(state, 1, None)
    store_release(state, bundle_files(first), pub)
    assert bundle_folder(None, "1-1", str(state.root)).endswith("releases/1-1")
    for bad in (("x", "latest", None), (None, None, None), (None, "latest", None)):
        with pytest.raises(ValueError):
            bundle_folder(*bad)
    with pytest.raises(FileNotFoundError, match="held: 1-1"):
        resolve_release(state.root, "nope-3")


# -- the coordinator's published list ---------------------------------------------------------------------------
def test_staged_release_ships_only_the_allowlisted_files(signed, tmp_path):
    from fedrad.server.publish import files_content, offer_content, published_releases, stage_release

    first, second, _, _ = signed
    extra = tmp_path / "bundle"
    shutil.copytree(first, extra)
    (extra / "run.py").write_text("import os; os.system('evil')\n")
    staged = stage_release(extra, tmp_path / "releases")
    stage_release(second, tmp_path / "releases")
    assert staged.name == "1-1" and sorted(p.name for p in staged.iterdir()) == sorted(bundle_files(first))
    latest = published_releases(tmp_path / "releases")[-1]
    assert latest.release_id == "1-2"
    record = files_content(latest)["bundle"]
    pieces = {k: a.numpy().tobytes() for k, a in record.items()}
    assert join_chunks(pieces, {**LIMITS, WEIGHTS: 1 << 30}) == bundle_files(second)
    assert dict(offer_content(latest)["config"])["release-sequence"] == 2


# -- the site's ClientApp -------------------------------------------------------------------------------------
def _site_app_call(msg, tmp_path: Path, pub: Path):
    """The site's real ClientApp (mods included), under a policy that refuses every training run of this
    config (SecAgg+ required): release messages touch no data, so that rule does not stop them."""
    from flwr.app import Context, RecordDict

    from fedrad.client.app.client_app import app
    from fedrad.client.site.policy import default_policy_text
    from fedrad.deploy.run_command import app_run_config

    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text().replace("require_secagg = false", "require_secagg = true"))
    node_config = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"),
                   "audit-dir": str(tmp_path / "audit"), "consortium-key": str(pub), "policy": str(policy)}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=app_run_config())
    return app(message=msg, context=context)


def test_client_app_answers_offer_and_files_with_codes_only(signed, tmp_path):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.client.app.wire_guard import check_outgoing
    from fedrad.common.release_wire import MESSAGE_FILES, MESSAGE_OFFER

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    first, _, _, pub = signed
    (tmp_path / "data").mkdir()
    offer = Message(RecordDict({"config": ConfigRecord({
        "release-id": "1-1", "release-run-id": "1", "release-run-key": "", "release-sequence": 1,
        "release-created": "2030-01-01T00:00:00Z"})}), dst_node_id=1, message_type=MESSAGE_OFFER)
    reply = _site_app_call(offer, tmp_path, pub)
    assert dict(reply.content.metric_records["metrics"]) == {RELEASE_CODE: ReleaseCode.REFUSED_NOT_PARTICIPANT}
    refusal = json.loads((tmp_path / "audit" / "refusals.jsonl").read_text().splitlines()[-1])
    assert refusal["rule"] == "release_refused_not_participant" and refusal["reply"] == {"error_code": 12}
    record_participation(SiteState(tmp_path / "state", tmp_path / "audit"), 1, None)
    assert dict(_site_app_call(offer, tmp_path, pub).content.metric_records["metrics"]) == {RELEASE_CODE: 1}

    def files_msg(files):
        arrays = {k: Array(np.frombuffer(v, dtype=np.uint8).copy()) for name, data in files.items()
                  for k, v in split_chunks(name, data, chunk=4096)}
        return Message(RecordDict({"bundle": ArrayRecord(arrays)}), dst_node_id=1, message_type=MESSAGE_FILES)

    bad = bundle_files(first)
    bad[WEIGHTS] = bad[WEIGHTS][:-1] + b"\0"
    reply = _site_app_call(files_msg(bad), tmp_path, pub)
    assert dict(reply.content.metric_records["metrics"]) == {RELEASE_CODE: ReleaseCode.REFUSED_UNVERIFIED}
    assert not (tmp_path / "state" / "releases").exists()
    reply = _site_app_call(files_msg(bundle_files(first)), tmp_path, pub)
    assert dict(reply.content.metric_records["metrics"]) == {RELEASE_CODE: ReleaseCode.STORED}
    assert check_outgoing(offer, reply) is None
    assert (tmp_path / "state" / "releases" / "1-1" / WEIGHTS).read_bytes() == (first / WEIGHTS).read_bytes()
    leaky = Message(RecordDict({"metrics": MetricRecord({RELEASE_CODE: 3, "num_files": 3})}), reply_to=offer)
    assert "not" in (check_outgoing(offer, leaky) or "")


# -- a real consortium ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_publish_reaches_every_site_and_refuses_tampering(tmp_path):
    """Three real sites train one tiny signed run; the release is published over Flower (site-c is down at
    that moment and gets it when it reconnects, while the publish run lingers); each site stores a copy that
    verifies with its own key; a tampered and an unsigned bundle pushed later are refused and leave nothing."""
    import signal
    import threading
    import time

    from federation_harness import Consortium

    from fedrad.deploy.publish_command import publish_bundle
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.release import release_bundle

    folders = write_synthetic_sites(tmp_path / "sites", n_sites=3, patients_per_site=4, images_per_patient=(1, 2),
                                    size=64, seed=1)
    sites = dict(zip(("site-a", "site-b", "site-c"), folders, strict=True))
    c = Consortium(tmp_path)
    try:
        c.start_link()
        for name, folder in sites.items():
            c.start_node(name, folder)
        run_dir = tmp_path / "run"
        assert c.run({"num-server-rounds": 1, "min-train-nodes": 3, "min-available-nodes": 3,
                      "fraction-evaluate": 0.0, "round-timeout": 300.0, "run-dir": str(run_dir)}) == 0
        bundle = release_bundle(run_dir, c.consortium_key, tmp_path / "bundle")
        c.group.kill(c.nodes.pop("site-c"), signal.SIGTERM)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=publish_bundle(
            bundle, tmp_path / "releases", c.address, c.consortium_key, linger=60.0, timeout=400)))
        worker.start()
        log = tmp_path / "releases" / "publish-log.jsonl"
        deadline = time.time() + 420
        while not (log.is_file() and log.read_text().count('"STORED"') >= 2) and time.time() < deadline:
            time.sleep(0.5)
        assert log.is_file(), "the two running sites were never served"
        c.start_node("site-c", sites["site-c"])  # reconnects after the others received the release
        worker.join(420)
        code, answers = result["out"]
        assert code == 0 and answers["STORED"] == 3, answers
        served = [json.loads(line) for line in log.read_text().splitlines()]
        # The stopped site-c's old node id may still be listed by the SuperLink for a while: it is left unanswered.
        assert {e["result"] for e in served} <= {"STORED", "no answer"}
        assert len({e["node"] for e in served if e["result"] == "STORED"}) == 3
        for name in sites:
            stored = resolve_release(tmp_path / "state" / name, "latest")
            assert verify_bundle(stored, c.consortium_pub)["release"]["run_id"] == str(json.loads(
                (run_dir / "run.json").read_text())["run_id"])
            assert (stored / WEIGHTS).read_bytes() == (bundle / WEIGHTS).read_bytes()

        # A tampered bundle (weights changed after signing) and an unsigned one, pushed in signed publish runs.
        for damage in ("tampered", "unsigned"):
            bad = tmp_path / damage
            shutil.copytree(bundle, bad)
            # Made to look newer (sequence 7), so every site asks for the files and must check them.
            (bad / MANIFEST).write_bytes((bad / MANIFEST).read_bytes().replace(b'"sequence": 1', b'"sequence": 7'))
            if damage == "unsigned":
                (bad / SIGNATURE).unlink()
            else:
                weights = bytearray((bad / WEIGHTS).read_bytes())
                weights[-1] ^= 1
                (bad / WEIGHTS).write_bytes(bytes(weights))
            before = {n: sorted(p.name for p in (tmp_path / "state" / n).rglob("*")) for n in sites}
            code, answers = publish_bundle(bad, tmp_path / f"releases-{damage}", c.address, c.consortium_key,
                                           timeout=300, verify=False)
            assert answers["REFUSED_UNVERIFIED"] == 3, answers
            for name in sites:
                after = sorted(p.name for p in (tmp_path / "state" / name).rglob("*"))
                assert after == before[name], (name, damage)
                assert [h.release_id for h in held_releases(tmp_path / "state" / name)] == [stored.name]
                rules = [json.loads(line)["rule"] for line in (c.audit_dir(name) / "refusals.jsonl")
                         .read_text().splitlines()]
                assert "release_refused_unverified" in rules
    finally:
        c.stop()
