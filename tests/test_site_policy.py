"""The site's policy and state: the hospital, not the coordinator, decides what runs and what ε it spends.

Over 500 lines on purpose: every policy rule and its file errors beside the real mod that enforces them.

Units for every policy rule and the file's validation; the real ClientApp mod and handler on a real
synthetic DICOM site (refusals carry only a fixed code, the rule stays in the site's audit); the DP ledger
across run keys; the state folder surviving a cleared cache; and one real-process consortium whose sites
hold different policies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from federation_harness import TINY_RUN, Consortium

from fedrad.client.site.policy import (
    PolicyError,
    check_coordinator_ca,
    check_run,
    default_policy,
    default_policy_text,
    epsilon_limit,
    load_policy,
    parse_policy,
)
from fedrad.client.site.site_state import (
    SiteStateError,
    count_activity,
    open_state,
    site_salt,
    state_paths,
)
from fedrad.common.protocol import ERROR_TEXT, ErrorCode
from fedrad.common.run_config import RunConfig


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_flower(kw)


# --- the policy file ---------------------------------------------------------------------------------


def test_default_policy_is_the_init_file_and_lets_the_shipped_configs_run():
    from fedrad.deploy.demo import DEMO_CONFIG

    default = default_policy()
    assert parse_policy(default_policy_text(), default.source) == default
    shipped = [
        {},  # pyproject's run-config defaults
        DEMO_CONFIG,
        TINY_RUN,
        dict(TINY_RUN, objective="simsiam", dp="sample", **{"dp-noise": 1.0, "dp-clip": 1.0, "dp-epsilon-budget": 9}),
        dict(TINY_RUN, objective="simclr", secagg=True, dp="client", **{"dp-noise": 1.0, "dp-clip": 1.0}),
        dict(TINY_RUN, objective="micle", strategy="fedadam"),
    ]
    for run in shipped:
        assert check_run(default, _cfg(**run)) is None, run
    assert default.label_fields == ("view", "body_part", "sex", "age", "modality", "plane", "contrast")
    from fedrad.common.models import KNOWN_MODELS

    assert default.models == KNOWN_MODELS
    assert default.epsilon_budget > 0 and "none" in default.dp_modes


@pytest.mark.parametrize("text,line,words", [
    ("[training]\nmax_image_size = [1\n", 2, "not valid TOML"),
    ("[training]\nmax_image_size = 64\n[hospital]\nx = 1\n", 3, "unknown table [hospital]"),
    ("\n[privacy]\nrequire_secagg = false\nepsilon = 3\n", 4, "unknown key privacy.epsilon"),
    ("[training]\n\nmax_batch_size = \"big\"\n", 3, "training.max_batch_size must be a whole number"),
    ("[training]\nmax_local_steps = 0\n", 2, "at least 1"),
    ("[privacy]\nrequire_secagg = \"yes\"\n", 2, "true or false"),
    ("[privacy]\nmin_dp_noise = -1.0\n", 2, "finite number >= 0"),
    ("[privacy]\ndp_delta = 0.5e1\n", 2, "between 0 and 1"),
    ("[privacy]\ndp_modes = []\n", 2, "dp_modes is empty"),
    ("[privacy]\ndp_modes = [\"central\"]\n", 2, "unknown dp mode 'central'"),
    ("[training]\nobjectives = [\"mae\"]\n", 2, "unknown objective 'mae'"),
    ("[training]\nmodels = []\n", 2, "models is empty"),
    ("[training]\nmodels = [\"resnet18\", \"hf-hub:timm/resnet18.a1_in1k\"]\n", 2, "not a plain timm name"),
    ("[training]\nmodels = [\"timm/resnet18\"]\n", 2, "not a plain timm name"),
    ("[training]\nmodels = [\"local-dir:/models/r18\"]\n", 2, "not a plain timm name"),
    ("[training]\nlabel_fields = [\"view,sex\"]\n", 2, "comma"),
    ("[training]\nlabel_fields = [3]\n", 2, "list of non-empty strings"),
    ("[coordinator]\nca_sha256 = \"abc\"\n", 2, "SHA-256 fingerprint"),
])
def test_bad_policy_files_name_the_line(text, line, words):
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "site.toml")
    assert str(err.value).startswith(f"site.toml:{line}: ") and words in str(err.value)


def test_partial_file_keeps_defaults_and_fingerprint_accepts_colons():
    fp = ":".join(["AB"] * 32)
    p = parse_policy(f'[coordinator]\nca_sha256 = "{fp}"\n[training]\nmax_image_size = 128\n', "site.toml")
    assert p.max_image_size == 128 and p.models == default_policy().models and p.source == "site.toml"


def test_every_rule_refuses_with_its_name():
    p = parse_policy("""
[training]
objectives = ["simclr", "supcon", "simsiam"]
models = ["test_resnet", "resnet18"]
max_image_size = 64
max_batch_size = 16
max_local_steps = 20
label_fields = ["view", "sex", "finding"]
[privacy]
require_secagg = true
dp_modes = ["client", "sample"]
min_dp_noise = 0.8
dp_delta = 1e-6
""", "site.toml")
    ok = dict(model="test_resnet", objective="simclr", **{"image-size": 64, "batch-size": 16, "local-steps": 20,
              "label-fields": "view,finding", "dp": "client", "dp-noise": 0.8, "dp-delta": 1e-6, "secagg": True})
    assert check_run(p, _cfg(**ok)) is None
    cases = {
        "models": [{"model": "hf-hub:timm/resnet18.a1_in1k"}, {"model": "timm/resnet18"}, {"model": "local-dir:/m"},
                   {"model": "resnet18/../../etc"}, {"model": "a:b"}, {"model": "resnet50"}],
        "objectives": [{"objective": "micle"}],
        "max_image_size": [{"image-size": 65}],
        "max_batch_size": [{"batch-size": 17}],
        "max_local_steps": [{"local-steps": 21}],
        "label_fields": [{"objective": "supcon", "label-fields": "view,hiv_status"},
                         {"objective": "supcon", "label-fields": "body_part"}],
        "require_secagg": [{"secagg": False}],
        "dp_modes": [{"dp": "none"}],
        "min_dp_noise": [{"dp-noise": 0.5}],
        "dp_delta": [{"dp-delta": 1e-5}],
    }
    for rule, variants in cases.items():
        for change in variants:
            refusal = check_run(p, _cfg(**dict(ok, **change)))
            assert refusal is not None and refusal.rule == rule, (rule, change, refusal)
    # label fields only matter to an objective that trains on them (SupCon)
    assert check_run(p, _cfg(**dict(ok, objective="supcon"))) is None
    assert check_run(p, _cfg(**dict(ok, **{"label-fields": "hiv_status"}))) is None  # simclr: never read
    # a hub model is refused even when the policy file lists nothing else: the name rule comes first
    assert check_run(default_policy(), _cfg(model="hf-hub:timm/resnet18")).rule == "models"


def test_epsilon_limit_is_the_stricter_budget():
    p = parse_policy("[privacy]\nepsilon_budget = 6.0\n", "s")
    assert epsilon_limit(p, _cfg(**{"dp-epsilon-budget": 8.0})) == 6.0
    assert epsilon_limit(p, _cfg(**{"dp-epsilon-budget": 3.0})) == 3.0
    assert epsilon_limit(p, _cfg()) == 6.0
    assert epsilon_limit(parse_policy("[privacy]\nepsilon_budget = 0\n", "s"), _cfg()) == 0.0


def test_cli_policy_init_and_check(tmp_path, capsys):
    from fedrad.deploy.cli import main

    path = tmp_path / "site.toml"
    assert main(["policy", "init", str(path)]) == 0
    assert load_policy(path) == parse_policy(default_policy_text(), str(path))
    assert main(["policy", "init", str(path)]) == 2  # never over an existing file
    assert main(["policy", "check", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    path.write_text(path.read_text().replace('models = ["test_resnet"', 'models = ["not_a_model_xyz", "test_resnet"'))
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith("models"))
    assert f"{path}:{line}: model 'not_a_model_xyz' is not a timm architecture" in err
    assert "Traceback" not in err
    assert main(["policy", "check", str(tmp_path / "missing.toml")]) == 2


def test_coordinator_ca_fingerprint(tmp_path, capsys):
    from fedrad.deploy.certs import init_certs, tls_files

    init_certs(tmp_path / "certs", ["site-a"], ["127.0.0.1"])
    ca = tls_files(tmp_path / "certs", "site-a").ca_cert
    out = subprocess.run(["openssl", "x509", "-in", str(ca), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, check=True).stdout
    openssl_fp = out.strip().split("=", 1)[1]  # AB:CD:... as a hospital's IT would copy it
    good = parse_policy(f'[coordinator]\nca_sha256 = "{openssl_fp}"\n', "site.toml")
    check_coordinator_ca(good, ca)
    wrong = parse_policy(f'[coordinator]\nca_sha256 = "{"0" * 64}"\n', "site.toml")
    with pytest.raises(PolicyError, match="not the one this site's policy"):
        check_coordinator_ca(wrong, ca)
    with pytest.raises(PolicyError, match="--certs"):
        check_coordinator_ca(good, None)
    # the node launcher refuses to start (exit 2, one line) before any Flower process exists
    from fedrad.deploy.cli import main
    from fedrad.deploy.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=2, size=32, seed=0)
    policy = tmp_path / "wrong.toml"
    policy.write_text(f'[coordinator]\nca_sha256 = "{"0" * 64}"\n')
    code = main(["node", "--data", str(site), "--no-scan", "--policy", str(policy), "--state-dir",
                 str(tmp_path / "state"), "--certs", str(tmp_path / "certs"), "--site-name", "site-a",
                 "--allow-unsigned"])
    assert code == 2
    err = capsys.readouterr().err
    assert "CA fingerprint" in err and len(err.strip().splitlines()) == 1


# --- the real mod and handler on a real site -------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("policy-site")
    (site,) = write_synthetic_sites(root, n_sites=1, patients_per_site=8, images_per_patient=(1, 2), size=48, seed=4)
    return site


def _context(tmp_path: Path, site: Path, run_config: dict, policy: str | None = None, node_id: int = 1):
    from flwr.app import Context, RecordDict

    node_config = {"data-dir": str(site), "cache-dir": str(tmp_path / "cache"), "state-dir": str(tmp_path / "state"),
                   "audit-dir": str(tmp_path / "audit"), "device": "cpu"}
    if policy:
        node_config["policy"] = policy
    return Context(run_id=7, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=dict(run_config))


def _message(cfg: RunConfig, run_key: str = "run-a", server_round: int = 1, message_type: str = "train",
             stage: str | None = None):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.common.models import build_model
    from fedrad.common.packing import pack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # as inside a ClientApp process
    content = RecordDict({"config": ConfigRecord({"server-round": server_round, "run-key": run_key})})
    if message_type == "train" and stage is None:
        import torch

        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
        content["arrays"] = pack(model.state_dict())  # fedrad's wire format
    if stage is not None:
        content["secaggplus_configs"] = ConfigRecord({"stage": stage})
    mtype = MessageType.TRAIN if message_type == "train" else MessageType.EVALUATE
    return Message(content=content, dst_node_id=1, message_type=mtype)


def _refusals(tmp_path: Path) -> list[dict]:
    path = tmp_path / "audit" / "refusals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_fixed_reply(reply, code: ErrorCode) -> None:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == int(code) and reply.error.reason == ERROR_TEXT[code]


def test_mod_refuses_before_the_handler_with_a_fixed_code(tmp_path, site):
    from fedrad.client.app.policy_mod import site_policy_mod

    policy = tmp_path / "site.toml"
    policy.write_text('[training]\nmax_image_size = 32\nlabel_fields = ["view", "finding"]\n')
    called = []

    def handler(m, c):
        called.append(m)
        return None

    run = dict(TINY_RUN, objective="supcon", **{"label-fields": "view,hiv_status"})
    for change, rule in ((dict(model="hf-hub:timm/resnet18.a1_in1k"), "models"),
                         ({"image-size": 64}, "max_image_size"),
                         ({}, "label_fields")):
        cfg_dict = dict(run, **change)
        ctx = _context(tmp_path, site, cfg_dict, str(policy))
        msg = _message(RunConfig.from_flower(dict(TINY_RUN)), message_type="evaluate")
        reply = site_policy_mod(msg, ctx, handler)
        _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
        assert "hiv_status" not in reply.error.reason and rule not in reply.error.reason
        assert _refusals(tmp_path)[-1]["rule"] == rule and _refusals(tmp_path)[-1]["reply"]["error_code"] == 4001
    assert not called
    assert "hiv_status" in _refusals(tmp_path)[-1]["detail"]  # the site's own audit says exactly why
    # nothing was decoded: the refusals came before any image was loaded
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("index.*"))
    # allowed: the handler runs
    ctx = _context(tmp_path, site, dict(run, **{"label-fields": "view,finding"}), str(policy))
    site_policy_mod(_message(RunConfig.from_flower(dict(TINY_RUN)), message_type="evaluate"), ctx, handler)
    assert len(called) == 1
    # a configured policy file that is missing or broken refuses everything (never the default)
    for bad in (str(tmp_path / "nope.toml"), str(tmp_path / "broken.toml")):
        (tmp_path / "broken.toml").write_text("[training\n")
        reply = site_policy_mod(_message(RunConfig(), message_type="evaluate"),
                                _context(tmp_path, site, TINY_RUN, bad), handler)
        _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
        assert _refusals(tmp_path)[-1]["rule"] == "policy_file"
    assert len(called) == 1


def test_rounds_per_day_counts_training_rounds_only(tmp_path, site):
    from fedrad.client.app.policy_mod import site_policy_mod

    policy = tmp_path / "site.toml"
    policy.write_text("[training]\nmax_rounds_per_day = 2\n")
    ctx = _context(tmp_path, site, TINY_RUN, str(policy))
    cfg = RunConfig.from_flower(dict(TINY_RUN))
    passed = []

    def handler(m, c):
        passed.append(m.metadata.message_type)
        return m

    for msg in (_message(cfg, stage="setup"), _message(cfg, stage="collect_masked_vectors"),
                _message(cfg, message_type="evaluate"), _message(cfg), _message(cfg, message_type="evaluate")):
        assert site_policy_mod(msg, ctx, handler) is msg
    reply = site_policy_mod(_message(cfg), ctx, handler)  # a third training round today
    _assert_fixed_reply(reply, ErrorCode.POLICY_REFUSED)
    assert _refusals(tmp_path)[-1]["rule"] == "max_rounds_per_day"
    state = state_paths(ctx.node_config)
    a_day_later = __import__("time").time() + 86_401
    assert count_activity(state, {"train": 3}, now=a_day_later) is None  # allowed again


def _dp_run(**kw) -> dict:
    return dict(TINY_RUN, objective="simsiam", dp="sample", **{"dp-noise": 1.0, "dp-clip": 1.0, "local-steps": 2}, **kw)


def test_fresh_run_key_does_not_reset_epsilon_and_cache_clear_keeps_it(tmp_path, site):
    """Real DP-SGD through handle_train: round 1 of run-a spends ε; a fresh run key cannot spend it again, under
    the site's budget or the run's own; clearing the cache keeps ε and the salt; losing the ledger refuses."""
    from fedrad.client.app.policy_mod import site_policy_mod
    from fedrad.client.app.task import handle_train
    from fedrad.client.site.budget import ledger_history, read_ledger
    from fedrad.client.training.sample_dp import epsilon_of

    def site_history(path):
        return ledger_history(read_ledger(path))

    def run_keys(path):
        return {e["run_key"] for e in read_ledger(path)["entries"].values()}

    policy = tmp_path / "site.toml"
    policy.write_text("[privacy]\nepsilon_budget = 0\n")

    def train(run_config: dict, run_key: str, server_round: int = 1, policy_path: str | None = str(policy)):
        ctx = _context(tmp_path, site, run_config, policy_path)
        msg = _message(RunConfig.from_flower(run_config), run_key=run_key, server_round=server_round)
        return site_policy_mod(msg, ctx, handle_train)

    reply = train(_dp_run(), "run-a")
    assert not reply.has_error()
    state = state_paths(_context(tmp_path, site, {}).node_config)
    (entry,) = json.loads(state.ledger.read_text())["entries"].values()
    assert entry["run_key"] == "run-a" and entry["status"] == "recorded" and entry["flower_run_id"] == 7
    ((sigma, q, steps),) = entry["history"]
    assert (sigma, steps) == (1.0, 2) and 0 < q <= 1
    eps1, eps2 = epsilon_of([(1.0, q, 2)], 1e-5), epsilon_of([(1.0, q, 4)], 1e-5)
    assert reply.content["metrics"]["dp_epsilon"] == pytest.approx(eps1, rel=1e-6)
    assert epsilon_of(site_history(state.ledger), 1e-5) == pytest.approx(eps1, rel=1e-6)
    budget = round((eps1 + eps2) / 2, 4)
    policy.write_text(f"[privacy]\nepsilon_budget = {budget}\n")  # the node reads its policy for every message
    salt = site_salt(state)

    # a second round of the same run, and a fresh run key, both refused by the site's own budget
    for key, rnd in (("run-a", 2), ("run-b", 1), ("flwr-fresh", 1)):
        reply = train(_dp_run(), key, rnd)
        _assert_fixed_reply(reply, ErrorCode.PRIVACY_BUDGET)
        assert _refusals(tmp_path)[-1]["rule"] == "epsilon_budget"
    # with no site budget, the run's own budget applies to the site's total: a fresh key still does not reset
    reply = train(_dp_run(**{"dp-epsilon-budget": budget}), "run-c", policy_path=None)
    _assert_fixed_reply(reply, ErrorCode.PRIVACY_BUDGET)
    assert epsilon_of(site_history(state.ledger), 1e-5) == pytest.approx(eps1, rel=1e-6)
    assert run_keys(state.ledger) == {"run-a"}

    # clearing the decoded cache keeps ε and the salt
    shutil.rmtree(tmp_path / "cache")
    reply = train(_dp_run(), "run-d")
    _assert_fixed_reply(reply, ErrorCode.PRIVACY_BUDGET)
    assert site_salt(state) == salt
    assert epsilon_of(site_history(state.ledger), 1e-5) == pytest.approx(eps1, rel=1e-6)

    # a ledger the state once held, lost or unreadable: everything is refused, ε never restarts at 0
    saved = state.ledger.read_bytes()
    state.ledger.unlink()
    reply = train(_dp_run(), "run-e", policy_path=None)
    _assert_fixed_reply(reply, ErrorCode.SITE_FAILED)
    assert _refusals(tmp_path)[-1]["rule"] == "site_state" and "missing" in _refusals(tmp_path)[-1]["detail"]
    state.ledger.write_text("{not json")
    _assert_fixed_reply(train(_dp_run(), "run-e", policy_path=None), ErrorCode.SITE_FAILED)
    assert "unreadable" in _refusals(tmp_path)[-1]["detail"]
    state.ledger.write_bytes(saved)
    assert not train(_dp_run(), "run-e", policy_path=None).has_error()  # restored: the site trains again
    assert run_keys(state.ledger) == {"run-a", "run-e"}
    assert json.loads(state.ledger.read_text())["site_epsilon"] == pytest.approx(eps2, rel=1e-6)


def test_patient_keys_survive_a_cleared_cache(tmp_path, site):
    """With the salt in the state folder, clearing the cache does not change the patient pseudonyms."""
    import inspect

    from fedrad.client.app.task import load_site_for
    from fedrad.client.site.site_data import load_site

    if "state_dir" not in inspect.signature(load_site).parameters:
        pytest.skip("site_data.load_site(state_dir=...) (salt in the state folder) is not on this branch yet")
    ctx = _context(tmp_path, site, {})
    cfg = RunConfig.from_flower(dict(TINY_RUN))
    before = load_site_for(ctx, cfg).patient_keys
    shutil.rmtree(tmp_path / "cache")
    assert load_site_for(ctx, cfg).patient_keys == before


def test_state_folder_rules(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(SiteStateError, match="inside the decoded-image cache"):
        open_state(state_paths({"state-dir": str(cache / "state")}), cache)
    # an older fedrad's salt and ledger in the cache are adopted once, byte for byte
    (cache / "salt.bin").write_bytes(b"s" * 32)
    (cache / "dp_sample_ledger.json").write_text(json.dumps({"runs": {"old": {"history": [[1.0, 0.5, 3]]}}}))
    state = open_state(state_paths({"state-dir": str(tmp_path / "state")}), cache)
    assert state.salt.read_bytes() == b"s" * 32 and "old" in json.loads(state.ledger.read_text())["runs"]
    marks = json.loads(state.marker.read_text())
    assert marks["salt"] and marks["ledger"] and len(marks["site_id"]) == 32
    state.salt.unlink()
    with pytest.raises(SiteStateError, match="salt.bin is missing"):
        open_state(state, cache)  # the cache's old salt is not silently adopted again either
    state.marker.write_text("[]")
    with pytest.raises(SiteStateError, match="not a fedrad site state"):
        open_state(state)
    # the default is outside the data folder, one per data folder
    from fedrad.client.site.site_state import default_state_dir

    a, b = default_state_dir(tmp_path / "a"), default_state_dir(tmp_path / "b")
    assert a != b and a.parent == b.parent and a.parent.name == "fedrad"
    assert a == default_state_dir(tmp_path / "x" / ".." / "a")  # one folder, however the path is written


# --- real processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_consortium_of_sites_with_different_policies(tmp_path):
    """Four real SuperNodes, one run asking for a CSV label column at 32 px without DP: the site whose policy
    allows it trains; the others refuse (label field, image size, DP floor) naming the rule in their own audit,
    and nothing of the rules or of a site's private column names reaches the coordinator's logs or metrics."""
    import csv

    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    sites = write_synthetic_sites(tmp_path / "sites", n_sites=4, patients_per_site=5, images_per_patient=(1, 2),
                                  size=48, seed=5)
    private = tmp_path / "private-labels.csv"  # site b's own label file: a column the coordinator must never see
    with open(sites[1] / "labels.csv", newline="") as src, open(private, "w", newline="") as dst:
        rows = list(csv.DictReader(src))
        w = csv.writer(dst)
        w.writerow(["file", "hiv_status"])
        w.writerows([r["file"], "positive" if i % 3 == 0 else "negative"] for i, r in enumerate(rows))
    allow_finding = 'label_fields = ["view", "body_part", "sex", "age", "finding"]\n'
    policies = {
        "a": "[training]\n" + allow_finding,
        "b": None,  # the built-in default: header fields only
        "c": "[training]\nmax_image_size = 24\n" + allow_finding,
        "d": "[training]\n" + allow_finding + '[privacy]\ndp_modes = ["sample"]\nmin_dp_noise = 1.0\n',
    }
    c = Consortium(tmp_path)
    try:
        c.start_link()
        for (name, text), site in zip(policies.items(), sites, strict=True):
            config: dict[str, object] = {}
            if text is not None:
                (tmp_path / f"{name}.toml").write_text(text)
                config["policy"] = str(tmp_path / f"{name}.toml")
            if name == "b":
                config["labels"] = str(private)
            c.start_node(name, site, config=config)
        run_dir = tmp_path / "run"
        code = c.run({"num-server-rounds": 1, "objective": "supcon", "label-fields": "view,finding",
                      "run-dir": str(run_dir), "min-train-nodes": 1, "min-available-nodes": 4})
    finally:
        c.stop()
    assert code == 0
    (row,) = read_metrics(run_dir)
    assert row["sites_aggregated"] == 1 and len(row["rejected"]) == 3
    assert all(why.endswith(ERROR_TEXT[ErrorCode.POLICY_REFUSED]) or "4001" in why for why in row["rejected"].values())
    expected = {"a": None, "b": "label_fields", "c": "max_image_size", "d": "dp_modes"}
    for name, rule in expected.items():
        audit = tmp_path / "audit" / name
        if rule is None:
            assert not (audit / "refusals.jsonl").exists()
            assert (audit / "outgoing.jsonl").exists()  # it trained and replied
            continue
        refusals = [json.loads(line) for line in (audit / "refusals.jsonl").read_text().splitlines()]
        assert {r["rule"] for r in refusals} == {rule}
        assert {r["message_type"] for r in refusals} == {"train", "evaluate"}
        assert all(r["reply"] == {"error_code": int(ErrorCode.POLICY_REFUSED)} for r in refusals)
    # the coordinator's side: run directory and its logs (not the sites' node logs)
    coordinator_files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".log")]
    coordinator_files += [tmp_path / "logs" / "flwr-run.log", tmp_path / "logs" / "superlink.log"]
    text = "\n".join(p.read_text(errors="replace") for p in coordinator_files)
    assert "refused by site policy" in text  # the fixed text did arrive ...
    for secret in ("hiv_status", "label_fields", "max_image_size", "dp_modes", "this site", "private-labels",
                   ".toml", str(tmp_path / "audit")):
        assert secret not in text, secret  # ... and nothing else of the site's reasons did


def test_pixel_budget_comes_from_the_policy(tmp_path):
    """data.max_megapixels bounds what a header may declare; a site can tighten it below the 64 Mpixel default."""
    assert default_policy().max_pixels == 64 << 20
    tight = parse_policy("[data]\nmax_megapixels = 1\n", "site.toml")
    assert tight.max_pixels == 1 << 20
    with pytest.raises(PolicyError, match=r"site.toml:2: data.max_megapixels must be at least 1"):
        parse_policy("[data]\nmax_megapixels = 0\n", "site.toml")
