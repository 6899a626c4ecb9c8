"""Pinned site code: a site runs only its own installed ClientApp, and only for runs the consortium signed.

The fast tests check what is signed and what the site checks; the real-process test submits a rogue FAB
(its pyproject names `clientapp = "evil_client:app"`, same publisher/name/version as fedrad) and a wrongly
signed genuine run to real SuperNodes, and a signed run that trains.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from federation_harness import Consortium
from flwr.common.config import parse_config_args

from fedrad.client.runtime.site_runtime import SiteTrust, check_run
from fedrad.common.protocol import ERROR_TEXT, ErrorCode
from fedrad.common.run_signature import SIGNATURE_KEY, fused_run_config
from fedrad.deploy.processes import app_dir, is_loopback
from fedrad.deploy.run_command import run_config_string
from fedrad.server.release import generate_keys
from fedrad.server.run_signing import build_fab

ROGUE_CLIENT = Path(__file__).parent / "rogue_app" / "evil_client.py"


def rogue_app(dest: Path) -> Path:
    """A Flower app that claims to be fedrad (same publisher, name, version, config) but names evil_client:app."""
    text = (app_dir() / "pyproject.toml").read_text()
    text, n_app = re.subn(r'(?m)^clientapp = ".*"$', 'clientapp = "evil_client:app"', text)
    text, n_inc = re.subn(r"(?m)^fab-include = .*$", 'fab-include = ["pyproject.toml", "*.py"]', text)
    assert n_app == 1 and n_inc == 1, "fedrad's pyproject changed shape; update rogue_app()"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(text)
    shutil.copy(ROGUE_CLIENT, dest / "evil_client.py")
    return dest


def small_genuine_app(dest: Path) -> Path:
    """fedrad's own pyproject alone: a small FAB with fedrad's identity, for the fast signature tests."""
    text = (app_dir() / "pyproject.toml").read_text()
    text = re.sub(r"(?m)^fab-include = .*$", 'fab-include = ["pyproject.toml"]', text)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(text)
    return dest


def _site_view(app: Path, config_text: str) -> tuple[bytes, dict]:
    """What a SuperNode hands the runtime: the FAB bytes and the run-config fused from them and the overrides."""
    fab = build_fab(app)
    return fab, fused_run_config(fab, parse_config_args([config_text]))


def test_signed_run_passes_and_every_alteration_is_refused(tmp_path):
    key, pub = generate_keys(tmp_path / "keys" / "consortium")
    _, other_pub = generate_keys(tmp_path / "keys" / "other")
    app = small_genuine_app(tmp_path / "app")
    overrides = {"model": "test_resnet", "lr": 0.0005, "round-timeout": 120.0, "run-dir": str(tmp_path / "r u n")}
    signed = run_config_string(overrides, app, key)
    fab, config = _site_view(app, signed)
    trust = SiteTrust(consortium_key=pub)
    assert check_run(trust, fab, config) is None
    assert build_fab(app) == fab, "Flower's FAB build must be byte-deterministic for the signature to hold"

    assert "not by the consortium key" in check_run(SiteTrust(consortium_key=other_pub), fab, config)
    assert "does not match" in check_run(trust, fab, {**config, "lr": 0.1})
    assert "does not match" in check_run(trust, fab, {**config, "label-fields": "hiv_status"})
    rogue_fab = build_fab(rogue_app(tmp_path / "rogue"))
    assert "does not match" in check_run(trust, rogue_fab, fused_run_config(rogue_fab, parse_config_args([signed])))
    assert "no signature" in check_run(trust, *_site_view(app, run_config_string(overrides, app)))
    assert "malformed" in check_run(trust, fab, {**config, SIGNATURE_KEY: "ab:cd"})
    assert "no consortium key" in check_run(SiteTrust(), fab, config)
    assert check_run(SiteTrust(allow_unsigned=True), fab, config) is None  # explicit local-experiment mode
    with pytest.raises(ValueError, match=SIGNATURE_KEY):
        run_config_string({SIGNATURE_KEY: "x"}, app, key)


def _signed_message(message_type: str = "train", server_round: int | None = 1):
    """A message as the runtime receives it: its type and (optionally) the server-round in its config."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 1, 1  # as inside a ClientApp process
    config = {} if server_round is None else {"server-round": server_round}
    return Message(content=RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type=message_type)


def test_signed_claims_bind_nonce_expiry_rounds_and_message_types(tmp_path):
    """The signature covers a nonce, a not-after time and the message types; the site binds the nonce to the
    first Flower run id that uses it and refuses it under another, refuses an expired statement, a
    server-round above the signed num-server-rounds and a message type the statement does not name."""
    import base64
    import time

    from fedrad.client.runtime.site_runtime import check_claims
    from fedrad.common.run_signature import (
        RELEASE_MESSAGES,
        RunClaims,
        format_signature,
        parse_signature,
        run_message_types,
    )
    from fedrad.server.run_signing import load_signing_key, sign_run

    key, pub = generate_keys(tmp_path / "keys" / "consortium")
    app = small_genuine_app(tmp_path / "app")
    fab = build_fab(app)
    overrides = {"num-server-rounds": 2, "model": "test_resnet"}
    before = time.time()
    signature = sign_run(fab, overrides, load_signing_key(key), valid_seconds=3600)
    config = {**fused_run_config(fab, overrides), SIGNATURE_KEY: signature}
    trust = SiteTrust(consortium_key=pub)
    assert check_run(trust, fab, config) is None
    signer, claims, raw = parse_signature(signature)
    assert claims.message_types == ("train", "evaluate")
    assert before + 3600 - 1 <= claims.not_after <= time.time() + 3600
    node = {"state-dir": str(tmp_path / "state")}

    assert check_claims(config, _signed_message(), 11, node) is None  # first use binds the nonce to run 11
    assert check_claims(config, _signed_message("evaluate", 2), 11, node) is None  # the same run goes on
    rule, why, code = check_claims(config, _signed_message(), 12, node)  # the same statement, another run
    assert (rule, code) == ("run_nonce", ErrorCode.RUN_REPLAYED) and "Flower run 11" in why
    rule, _, code = check_claims(config, _signed_message(server_round=3), 11, node)
    assert (rule, code) == ("run_rounds", ErrorCode.RUN_OUT_OF_BOUNDS)
    rule, _, code = check_claims(config, _signed_message("query.release_offer", None), 11, node)
    assert (rule, code) == ("run_message_types", ErrorCode.RUN_OUT_OF_BOUNDS)
    # the not-after bounds the START only: run 11, accepted before it, is served on after it (weeks later too)
    assert check_claims(config, _signed_message("train", 2), 11, node, now=claims.not_after + 1) is None
    assert check_claims(config, _signed_message("train", 2), 11, node, now=claims.not_after + 40 * 86_400) is None
    late = {**config, SIGNATURE_KEY: sign_run(fab, overrides, load_signing_key(key), valid_seconds=60)}
    late_claims = parse_signature(late[SIGNATURE_KEY])[1]
    rule, why, code = check_claims(late, _signed_message(), 13, node, now=late_claims.not_after + 1)  # a new run
    assert (rule, code) == ("run_expiry", ErrorCode.RUN_EXPIRED) and "had to start by" in why
    assert late_claims.nonce not in (tmp_path / "state" / "run_nonces.json").read_text()  # nothing was bound
    nonces = tmp_path / "state" / "run_nonces.json"
    assert nonces.stat().st_mode & 0o777 == 0o600 and claims.nonce in nonces.read_text()
    # a fresh signature of the same config is a fresh nonce: runs anew
    again = {**config, SIGNATURE_KEY: sign_run(fab, overrides, load_signing_key(key))}
    assert check_run(trust, fab, again) is None and check_claims(again, _signed_message(), 12, node) is None

    # the claims are signed: a later not-after, another nonce or more message types break the signature
    for forged in (RunClaims(claims.nonce, claims.not_after + 10**6, claims.message_types),
                   RunClaims("0" * 32, claims.not_after, claims.message_types),
                   RunClaims(claims.nonce, claims.not_after, (*claims.message_types, *RELEASE_MESSAGES))):
        tampered = {**config, SIGNATURE_KEY: format_signature(signer, forged, raw)}
        assert "does not match" in check_run(trust, fab, tampered)
    # a version-1 signature (no claims: replayable forever) is not accepted
    v1 = f"{signer}:{base64.b64encode(raw).decode()}"
    assert "malformed" in check_run(trust, fab, {**config, SIGNATURE_KEY: v1})
    # `fedrad run --sign-key --valid-days`: the operator's validity reaches the claims
    short = parse_config_args([run_config_string(overrides, app, key, valid_seconds=60)])[SIGNATURE_KEY]
    assert parse_signature(short)[1].not_after <= time.time() + 60
    with pytest.raises(ValueError, match="validity"):
        run_config_string(overrides, app, key, valid_seconds=-1)
    # what a run may send follows its config: a publish-only run sends only the release queries
    assert run_message_types({"publish-only": True, "publish-dir": "/r"}) == RELEASE_MESSAGES
    assert run_message_types({"publish-dir": "/r"}) == ("train", "evaluate", *RELEASE_MESSAGES)


def test_loopback_detection():
    assert all(is_loopback(a) for a in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.1.2.3:1", "::1"])
    assert not any(is_loopback(a) for a in ["10.0.0.5:8000", "coordinator.example.org:8000", "0.0.0.0:8000",
                                            "[2001:db8::1]:8000"])


def _refusals(audit: Path) -> list[dict]:
    path = audit / "refusals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_rogue_fab_never_runs_and_only_consortium_signed_runs_train(tmp_path):
    """`loyal` trusts the consortium key, `other` another consortium's key; `broken` trusts the consortium but
    its data folder is gone.

    1. A rogue FAB carrying a genuine signature replayed from the real FAB: all refuse before touching data,
       its code never runs (no marker, nothing of it on disk), the coordinator sees only the fixed text.
    2. The genuine FAB signed by the consortium: `loyal` trains, `other` refuses it (signed by a key it does
       not trust), `broken` fails with a fixed code and no path; every error reply audited at its site.
    """
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    sites = write_synthetic_sites(tmp_path / "sites", n_sites=2, patients_per_site=4, images_per_patient=(1, 2),
                                  size=64, seed=3)
    marker = tmp_path / "ROGUE_CODE_RAN"
    c = Consortium(tmp_path)
    _, other_pub = generate_keys(tmp_path / "keys" / "other")
    try:
        c.start_link()
        homes = {name: tmp_path / "flwr-home" / name for name in ("loyal", "other")}
        env = {"FEDRAD_TEST_ROGUE_MARKER": str(marker)}
        c.start_node("loyal", sites[0], env={**env, "FLWR_HOME": str(homes["loyal"])})
        c.start_node("other", sites[1], env={**env, "FLWR_HOME": str(homes["other"])},
                     trust=SiteTrust(consortium_key=other_pub))
        broken_data = tmp_path / "gone" / "PATIENT-FOLDER-XYZ"
        c.start_node("broken", broken_data, env=env)

        # 1. Rogue FAB with a replayed genuine signature over the same run-config.
        cfg = {"num-server-rounds": 1, "objective": "simclr", "run-dir": str(tmp_path / "rogue-run"),
               "min-train-nodes": 1, "min-available-nodes": 3, "round-timeout": 90.0}
        from federation_harness import TINY_RUN

        genuine = parse_config_args([run_config_string({**TINY_RUN, **cfg}, app_dir(), c.consortium_key)])
        code = c.run({**cfg, SIGNATURE_KEY: genuine[SIGNATURE_KEY]}, app=rogue_app(tmp_path / "rogue-app"),
                     sign_key=False, timeout=300)
        assert code != 0 or not (tmp_path / "rogue-run" / "summary.json").exists()
        assert not marker.exists(), marker.read_text()
        assert not [p for h in homes.values() if h.exists() for p in h.rglob("evil_client.py")]
        loyal, other = _refusals(c.audit_dir("loyal")), _refusals(c.audit_dir("other"))
        assert loyal and all(r["code"] == ErrorCode.RUN_NOT_SIGNED and "does not match" in r["reason"] for r in loyal)
        assert other and all("not by the consortium key" in r["reason"] for r in other)
        assert all(r["event"] == "refused" for r in _refusals(c.audit_dir("broken")))  # refused before its data
        run_log = (tmp_path / "logs" / "flwr-run.log").read_text()
        assert ERROR_TEXT[ErrorCode.RUN_NOT_SIGNED] in run_log
        assert "does not match" not in run_log and str(sites[0]) not in run_log  # reasons stay at the site

        # 2. The genuine FAB, signed: the loyal site trains, the other refuses it.
        n_other = len(other)
        run_dir = tmp_path / "run"
        code = c.run({**cfg, "run-dir": str(run_dir)}, timeout=400)
        assert code == 0
        (row,) = read_metrics(run_dir)
        assert row["sites_aggregated"] == 1
        assert len(_refusals(c.audit_dir("loyal"))) == len(loyal)  # nothing new refused at the loyal site
        assert len(_refusals(c.audit_dir("other"))) > n_other
        # The broken site's handler raised: the wire guard answered SITE_FAILED and audited the detail there.
        outgoing = [json.loads(line) for line in (c.audit_dir("broken") / "outgoing.jsonl").read_text().splitlines()]
        failures = [e for e in outgoing if (e.get("error") or {}).get("code") == ErrorCode.SITE_FAILED]
        assert failures and "PATIENT-FOLDER-XYZ" in failures[0]["error"]["detail"]
        run_log = (tmp_path / "logs" / "flwr-run.log").read_text()
        assert ERROR_TEXT[ErrorCode.SITE_FAILED] in run_log and "PATIENT-FOLDER-XYZ" not in run_log
        assert not marker.exists()
    finally:
        c.stop()


@pytest.mark.slow
def test_a_replayed_signed_run_is_refused_at_a_real_supernode(tmp_path):
    """A genuine signed run trains; the very same signed FAB and run-config submitted again (a new Flower run,
    as whoever holds one signed run could do at any time) is refused by the site's runtime with a fixed code
    before any data is touched: nothing is trained, the rule and reason stay in the site's audit."""
    from federation_harness import TINY_RUN

    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=4, images_per_patient=(1, 2),
                                    size=64, seed=5)
    c = Consortium(tmp_path)
    try:
        c.start_link()
        c.start_node("s0", site)
        run_dir = tmp_path / "run"
        cfg = {"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir), "min-train-nodes": 1,
               "min-available-nodes": 1, "round-timeout": 90.0, "fraction-evaluate": 0.0}
        signed = parse_config_args([run_config_string({**TINY_RUN, **cfg}, app_dir(), c.consortium_key)])
        assert c.run({**cfg, SIGNATURE_KEY: signed[SIGNATURE_KEY]}, sign_key=False, timeout=400) == 0
        (row,) = read_metrics(run_dir)
        assert row["sites_aggregated"] == 1
        activity = tmp_path / "state" / "s0" / "rounds.json"
        trained = json.loads(activity.read_text())["train"]
        assert len(trained) == 1 and not _refusals(c.audit_dir("s0"))

        run_dir.rename(tmp_path / "first-run")  # the replay names the same (signed) run-dir
        c.run({**cfg, SIGNATURE_KEY: signed[SIGNATURE_KEY]}, sign_key=False, timeout=400)
        refusals = _refusals(c.audit_dir("s0"))
        assert refusals and all(r["code"] == ErrorCode.RUN_REPLAYED and r["rule"] == "run_nonce" for r in refusals)
        assert json.loads(activity.read_text())["train"] == trained  # nothing trained
        if run_dir.exists():  # the coordinator's side of the replay aggregated nothing
            assert not read_metrics(run_dir)
        run_log = (tmp_path / "logs" / "flwr-run.log").read_text()
        assert ERROR_TEXT[ErrorCode.RUN_REPLAYED] in run_log and "nonce" not in run_log  # the reason stays home
    finally:
        c.stop()
