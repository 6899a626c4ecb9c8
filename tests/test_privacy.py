"""Privacy: SecAgg+ equals plain FedAvg on the same updates, the DP budget stops a run, SecAgg+ with DP, and
the loud failures (mismatched SecAgg+ configuration, DP with objectives that couple samples)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from federation_harness import Consortium

from fedrad.common.run_config import RunConfig
from fedrad.server.privacy import PrivacyLedger, privacy_summary


def test_dp_sample_refuses_coupled_objectives():
    for objective in ("simclr", "supcon", "micle"):
        with pytest.raises(ValueError, match="couples the images of a batch"):
            RunConfig(dp="sample", objective=objective, dp_noise=1.0)
    with pytest.raises(ValueError, match="dp-noise"):
        RunConfig(dp="client", dp_noise=0.0)
    with pytest.raises(ValueError, match="unknown"):
        RunConfig(dp="central")


def test_ledger_epsilon_grows_and_budget_is_prospective():
    cfg = RunConfig(dp="client", dp_noise=1.0, dp_delta=1e-5)
    ledger = PrivacyLedger.for_run(cfg, 3)
    assert ledger.epsilon == 0.0
    e1 = ledger.record(1, 3, 3)
    e2 = ledger.record(2, 3, 3)
    assert 0 < e1 < e2
    ledger.budget = (e2 + ledger.would_exceed(3)[1]) / 2
    exceed, e3 = ledger.would_exceed(3)
    assert exceed and e3 > ledger.budget > e2
    # fewer sites averaged than the noise was calibrated for: less noise per site, more epsilon
    other = PrivacyLedger.for_run(cfg, 3)
    assert other.record(1, 3, 2) > e1
    restored = PrivacyLedger.for_run(cfg, 3)
    restored.restore(ledger.rounds)
    assert restored.epsilon == pytest.approx(e2)
    summary = privacy_summary(cfg, ledger, 2, 3)
    assert summary["formal_guarantee"] and summary["epsilon"] == pytest.approx(e2, rel=1e-5)
    assert privacy_summary(RunConfig(), None, 2, 3)["formal_guarantee"] is False


def _train_message(secagg: bool):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as inside a ClientApp process

    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})})
    if secagg:
        content["secaggplus_configs"] = ConfigRecord({"stage": "setup"})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("run_secagg,msg_secagg", [(True, False), (False, True)])
def test_site_refuses_secagg_mismatch(run_secagg, msg_secagg):
    from flwr.app import Context, RecordDict

    from fedrad.client.app.privacy_mods import privacy_mod

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"secagg": run_secagg})
    called = []
    reply = privacy_mod(_train_message(msg_secagg), ctx, lambda m, c: called.append(m))
    assert reply.has_error() and not called
    from fedrad.common.protocol import ERROR_TEXT, ErrorCode

    assert reply.error.code == ErrorCode.PROTOCOL_MISMATCH
    assert reply.error.reason == ERROR_TEXT[ErrorCode.PROTOCOL_MISMATCH]  # the why stays in the site's log


def test_apply_mean_update_keeps_dtypes():
    from flwr.app import Array, ArrayRecord

    from fedrad.server.secagg import apply_mean_update

    arrays = ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "n": Array(np.array(4, np.int64))})
    out = apply_mean_update(arrays, [np.full((2, 2), 0.5), np.array(0.0)], local_steps=3)
    assert out["w"].numpy().dtype == np.float32 and np.allclose(out["w"].numpy(), 1.5)
    assert out["n"].numpy() == 7 and out["n"].numpy().dtype == np.int64


# --- real processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consortium3(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("privacy")
    sites = write_synthetic_sites(root / "sites", n_sites=3, patients_per_site=6, images_per_patient=(1, 3),
                                  size=64, seed=1)
    c = Consortium(root)
    c.start_link()
    for i, site in enumerate(sites):
        c.start_node(f"s{i}", site)
    yield c, root
    c.stop()


def _tensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / "checkpoints" / "round-0001.safetensors")


@pytest.mark.slow
def test_secagg_round_equals_plain_fedavg(consortium3):
    """Same sites, same seed, one round: the SecAgg+ global model is the plain FedAvg one within quantisation."""
    from fedrad.server.run_log import read_metrics
    from fedrad.server.secagg import quantisation_tolerance

    c, root = consortium3
    # max-example-factor 0: the plain round would cap a site claiming > 1.5x the median count (screening), which
    # SecAgg+ cannot see (the weight travels masked); the comparison is of the aggregation, not of that defence.
    base = {"num-server-rounds": 1, "objective": "simclr", "min-train-nodes": 3, "min-available-nodes": 3,
            "max-example-factor": 0}
    assert c.run(dict(base, **{"run-dir": str(root / "plain")})) == 0
    assert c.run(dict(base, **{"run-dir": str(root / "secagg"), "secagg": True})) == 0
    plain, secure = _tensors(root / "plain"), _tensors(root / "secagg")
    (row,) = read_metrics(root / "plain")
    (srow,) = read_metrics(root / "secagg")
    assert srow["secagg"] and srow["sites_aggregated"] == 3
    weights = [m["num_examples"] for m in row["sites"].values()]
    tol = quantisation_tolerance(weights)
    import torch

    from fedrad.common.models import build_model

    torch.manual_seed(0)
    init = build_model("test_resnet", "simclr", 32, proj_dim=32).state_dict()
    moved = 0.0
    for key, value in plain.items():
        if not key.startswith("model/") or value.dtype.kind != "f":
            np.testing.assert_array_equal(secure[key], value)
            continue
        np.testing.assert_allclose(secure[key], value, atol=tol, rtol=0, err_msg=key)
        moved = max(moved, float(np.abs(value - init[key[len("model/"):]].numpy()).max()))
    assert moved > 20 * tol, "the round should have trained far beyond the quantisation error"
    summary = json.loads((root / "secagg" / "summary.json").read_text())
    assert summary["privacy"]["secure_aggregation"] is True
    # What each site sent is in its audit log: the wire guard (outermost) checked every SecAgg+ stage's
    # real reply (keys, shares, masked vectors of the model's shapes, FitRes metrics) and blocked none.
    audit = [json.loads(line) for line in (root / "audit" / "s0" / "outgoing.jsonl").read_text().splitlines()]
    stages = [e["stage"] for e in audit if e["stage"]]
    assert stages == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert all(e["blocked"] is None and "error" not in e for e in audit)


@pytest.mark.slow
def test_secagg_with_dp_then_budget_stops_the_run(consortium3):
    """SecAgg+ and client-level DP together complete a round; the epsilon budget stops the run before round 2."""
    from fedrad.server.run_log import read_metrics

    c, root = consortium3
    cfg = RunConfig(dp="client", dp_noise=1.0, dp_delta=1e-5)
    ledger = PrivacyLedger.for_run(cfg, 3)
    e1 = ledger.record(1, 3, 3)
    e2 = ledger.would_exceed(3)[1]
    budget = round((e1 + e2) / 2, 3)
    run_dir = root / "secagg-dp"
    code = c.run({"num-server-rounds": 3, "objective": "simclr", "run-dir": str(run_dir), "secagg": True,
                  "dp": "client", "dp-noise": 1.0, "dp-clip": 1.0, "dp-epsilon-budget": budget,
                  "min-train-nodes": 3, "min-available-nodes": 3})
    assert code == 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["sites_aggregated"] == 3
    assert rows[0]["dp_epsilon"] == pytest.approx(e1, rel=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and "dp-epsilon-budget" in summary["stopped"]
    p = summary["privacy"]
    assert p["formal_guarantee"] and p["secure_aggregation"] and p["epsilon"] <= budget
    assert p["noise_multiplier"] == 1.0 and p["clipping_norm"] == 1.0 and p["delta"] == 1e-5
    assert (run_dir / "global.safetensors").exists()


@pytest.mark.slow
def test_plain_dp_round(consortium3):
    """dp=client without SecAgg+: Flower's server-side clipping wrapper, epsilon logged every round."""
    from fedrad.server.run_log import read_metrics

    c, root = consortium3
    run_dir = root / "dp"
    code = c.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir), "dp": "client",
                  "dp-noise": 0.5, "dp-clip": 1.0, "min-train-nodes": 3, "min-available-nodes": 3})
    assert code == 0
    (row,) = read_metrics(run_dir)
    assert row["sites_aggregated"] == 3 and row["dp_epsilon"] > 0
    import safetensors.torch
    import timm

    timm.create_model("test_resnet", in_chans=1, num_classes=0).load_state_dict(
        safetensors.torch.load_file(run_dir / "global.safetensors"))


@pytest.mark.slow
def test_sample_dp_run_ledgers_budget_and_release(consortium3, tmp_path):
    """dp=sample on real processes: GroupNorm simsiam trained with opacus at each site, each site's ε in
    its own ledger and in metrics.jsonl, the budget stops the run before a site would pass it, and the
    released bundle says image-level DP and loads as the GroupNorm variant."""
    from fedrad.client.site.site_data import load_site
    from fedrad.client.training.sample_dp import epsilon_of
    from fedrad.common.bundle import load_verified_backbone
    from fedrad.server.release import generate_keys, release_bundle
    from fedrad.server.run_log import read_metrics

    c, root = consortium3
    sites = sorted(p for p in (root / "sites").iterdir() if p.is_dir())
    sizes = [len(load_site(s, 32, cache_dir=tmp_path / s.name, progress=False)) for s in sites]
    assert all(n < 20 for n in sizes)  # tiny sites: no held-out split, every image is sampled
    qs = [min(1.0, 8 / n) for n in sizes]
    eps2 = max(epsilon_of([(1.0, q, 6)], 1e-5) for q in qs)
    eps3 = max(epsilon_of([(1.0, q, 9)], 1e-5) for q in qs)
    budget = round((eps2 + eps3) / 2, 3)
    run_dir = root / "dp-sample"
    code = c.run({"num-server-rounds": 4, "objective": "simsiam", "run-dir": str(run_dir), "dp": "sample",
                  "dp-noise": 1.0, "dp-clip": 1.0, "dp-epsilon-budget": budget,
                  "min-train-nodes": 3, "min-available-nodes": 3})
    assert code == 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites_aggregated"] == 3 for r in rows)
    for r in rows:  # the round's ε is the worst site's, not an average
        assert r["dp_epsilon"] == max(m["dp_epsilon"] for m in r["sites"].values())
    assert rows[1]["dp_epsilon"] == pytest.approx(eps2, rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "dp-epsilon-budget" in summary["stopped"] and summary["rounds"] == 2
    p = summary["privacy"]
    assert p["formal_guarantee"] and p["unit"].startswith("image") and len(p["site_epsilons"]) == 3
    assert max(p["site_epsilons"].values()) <= budget
    # every site kept its own ledger: one recorded entry per trained message, the run-key only a label
    run_key = json.loads((run_dir / "run.json").read_text())["run_key"]
    for i in range(3):
        ledger = json.loads((root / "state" / f"s{i}" / "dp_sample_ledger.json").read_text())
        entries = [e for e in ledger["entries"].values() if e["status"] == "recorded"]
        assert [e["server_round"] for e in entries] == [1, 2] and {e["run_key"] for e in entries} == {run_key}
        assert len({e["message_id"] for e in entries}) == 2 and len({e["flower_run_id"] for e in entries}) == 1
        history = [tuple(h) for e in ledger["entries"].values() for h in e["history"]]
        assert len(ledger["entries"]) == 2 and sum(h[2] for h in history) == 6
        assert ledger["site_epsilon"] == pytest.approx(epsilon_of(history, 1e-5))
    # the released weights are the GroupNorm variant and say what protects them
    key, pub = generate_keys(tmp_path / "keys")
    bundle = release_bundle(run_dir, key)
    backbone, manifest = load_verified_backbone(bundle, pub)
    assert manifest["norm"] == "group" and manifest["privacy"]["unit"].startswith("image")
    assert any(isinstance(m, __import__("torch").nn.GroupNorm) for m in backbone.modules())


@pytest.mark.slow
def test_secagg_tolerates_a_site_dropping_within_the_threshold(tmp_path):
    """4 sites, shares 3, threshold 2: one site fails during the masked-vector stage (its data has a single
    image, so local training raises); SecAgg+ reconstructs its masks from the survivors' shares and the
    round aggregates the other three."""
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    good = write_synthetic_sites(tmp_path / "sites", n_sites=3, patients_per_site=6, images_per_patient=(1, 3),
                                 size=64, seed=2)
    (broken,) = write_synthetic_sites(tmp_path / "broken", n_sites=1, patients_per_site=1,
                                      images_per_patient=(1, 1), size=64, seed=3)
    c = Consortium(tmp_path)
    try:
        c.start_link()
        for i, site in enumerate([*good, broken]):
            c.start_node(f"d{i}", site)
        run_dir = tmp_path / "dropout"
        code = c.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir), "secagg": True,
                      "secagg-shares": 3, "secagg-threshold": 2, "min-train-nodes": 4, "min-available-nodes": 4})
    finally:
        c.stop()
    assert code == 0
    (row,) = read_metrics(run_dir)
    assert row["secagg"] and row["aggregated"]
    assert row["sites_aggregated"] == 3  # the broken site dropped out, the round survived
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
