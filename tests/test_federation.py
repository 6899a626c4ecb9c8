"""Federation on real Flower processes: a SuperLink and SuperNodes on loopback, a tiny model, real DICOMs.

Each test starts its own consortium and stops every process it started.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from federation_harness import POISON_APP, POISON_CLIENT, Consortium, wait_for

from fedrad.client.runtime.site_runtime import SiteTrust
from fedrad.server.run_log import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("sites")
    return write_synthetic_sites(root, n_sites=3, patients_per_site=6, images_per_patient=(1, 3), size=64, seed=1)


@pytest.fixture
def consortium(tmp_path):
    c = Consortium(tmp_path)
    yield c
    c.stop()


def test_rounds_checkpoints_and_wire_content(consortium, sites, tmp_path):
    """Two sites, two rounds: the run directory is complete and only model arrays and numbers left the sites.

    The run starts from a local RGB timm checkpoint (`init`) and a warm-up + cosine round LR, which each site
    checks against the signed run config before training. The representation monitor is on for `finding`,
    which both sites' policies allow: its AUCs reach metrics.jsonl as numbers only."""
    import hashlib

    import timm
    from safetensors.torch import save_file

    from fedrad.common.lr_schedule import lr_table

    ckpt = tmp_path / "rgb-test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", in_chans=3).state_dict().items()},
              str(ckpt))
    policy = tmp_path / "site-policy.toml"
    policy.write_text('[training]\nlabel_fields = ["view", "body_part", "sex", "age", "modality", "finding"]\n')
    consortium.start_link()
    for i, site in enumerate(sites[:2]):
        consortium.start_node(f"s{i}", site, config={"policy": str(policy)})
    run_dir = tmp_path / "run"
    code = consortium.run({"num-server-rounds": 2, "objective": "micle", "run-dir": str(run_dir), "init": str(ckpt),
                           "lr-schedule": "cosine", "warmup-rounds": 1, "probe-monitor": "finding"})
    assert code == 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    lr = float(json.loads((run_dir / "run.json").read_text())["config"]["lr"])
    assert [r["lr"] for r in rows] == pytest.approx(lr_table(lr, 2, "cosine", 1))
    assert json.loads((run_dir / "run.json").read_text())["init"]["sha256"] == hashlib.sha256(
        ckpt.read_bytes()).hexdigest()
    assert all(r["sites_aggregated"] == 2 for r in rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.safetensors",
                                                                          "round-0002.safetensors"]
    assert (run_dir / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The representation monitor: each round's weighted AUCs, from the sites whose labels give one.
    for r in rows:
        assert 0.0 <= r["knn_auc"] <= 1.0 and 0.0 <= r["probe_auc"] <= 1.0 and r["probe_examples"] >= 8, r
        measured = [m for m in r["sites"].values() if "knn_auc" in m]
        assert measured and r["probe_examples"] == sum(m["probe_examples"] for m in measured)
    # Each site's log file shows its own progress, one line per message, in plain text.
    node_log = (tmp_path / "logs" / "node-s0.log").read_text()
    assert "round 1 train (micle):" in node_log and "round 2 evaluate (micle): held-out loss" in node_log
    assert "images/s" in node_log and "\x1b[" not in node_log
    assert "round 2 probe monitor" in node_log

    import safetensors.torch
    import timm

    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=0)
    backbone.load_state_dict(safetensors.torch.load_file(run_dir / "global.safetensors"))

    # What crossed the wire, as recorded by each site's outgoing-message audit.
    from fedrad.common.models import build_model
    from fedrad.common.packing import Layout

    # the model packed in fedrad's wire format: one 1-D array per dtype, exactly the model's element counts
    model_shapes = {g: [n] for g, n in Layout.of(build_model("test_resnet", "micle", 32, proj_dim=32)
                                                 .state_dict()).groups.items()}
    header_strings = _header_strings(sites[:2])
    entries = []
    for name in ("s0", "s1"):
        lines = (tmp_path / "audit" / name / "outgoing.jsonl").read_text().splitlines()
        entries += [json.loads(line) for line in lines]
    assert {e["message_type"] for e in entries} == {"train", "evaluate"}
    assert len(entries) == 2 * 2 * 2  # 2 sites x 2 rounds x (train + evaluate)
    for e in entries:
        assert e["blocked"] is None
        for record in e["content"].values():
            assert record["kind"] in ("arrays", "metrics"), record
            if record["kind"] == "arrays":
                shapes = {k: v["shape"] for k, v in record["arrays"].items()}
                assert shapes == model_shapes  # exactly the model's arrays, nothing shaped like an image
            else:
                for value in record["values"].values():
                    assert isinstance(value, int | float)
        text = json.dumps(e)
        for s in header_strings:
            assert s not in text, f"header value {s!r} left the site"


def _header_strings(sites: list[Path]) -> set[str]:
    """Identifying strings from the sites' DICOM headers (IDs, UIDs, names) that must never be sent."""
    import pydicom

    out: set[str] = set()
    for site in sites:
        for path in sorted(site.rglob("*.dcm"))[:10]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for tag in ("PatientID", "PatientName", "StudyInstanceUID", "SOPInstanceUID", "InstitutionName"):
                value = str(ds.get(tag, "") or "")
                if len(value) >= 4:
                    out.add(value)
    assert out, "the synthetic sites should carry identifiers to look for"
    return out


def test_poisoned_update_is_rejected(consortium, sites, tmp_path):
    """Lying sites cannot own the round and a failing site's error text never reaches the coordinator:
    NaN weights and a x5 scaled update are rejected, a claimed 1e9 examples is capped, a site whose data
    folder is missing answers with a bare code (its path stays in its own log and audit file)."""
    secret = "ward7-hiv_status-DOE_JANE"
    consortium.start_link()
    # The two lying sites run the poisoning ClientApp of their own choice (the FAB cannot choose it).
    liar = SiteTrust(consortium_key=consortium.consortium_pub, client_app=POISON_CLIENT, client_app_dir=POISON_APP)
    consortium.start_node("good", sites[0])
    consortium.start_node("nan", sites[1], env={"FEDRAD_TEST_POISON": "nan"}, trust=liar)
    consortium.start_node("scaled", sites[2], env={"FEDRAD_TEST_POISON": "scale5"}, trust=liar)
    consortium.start_node("count", sites[1], env={"FEDRAD_TEST_POISON": "count"}, trust=liar)
    consortium.start_node("broken", tmp_path / secret)  # raises inside the handler: path in the exception
    run_dir = tmp_path / "run"
    code = consortium.run({"num-server-rounds": 1, "objective": "simclr", "run-dir": str(run_dir),
                           "min-train-nodes": 1, "min-available-nodes": 5})
    assert code == 0
    (row,) = read_metrics(run_dir)
    assert row["sites_answered"] == 4
    assert row["sites_aggregated"] == 2  # good + the capped liar
    reasons = sorted(row["rejected"].values())
    assert len(reasons) == 3
    assert any("NaN" in r for r in reasons)
    assert any("update norm" in r for r in reasons)
    assert any("code 5001" in r for r in reasons)  # SITE_FAILED, by code only
    assert [r for r in row["capped"].values() if "claimed 1e+09" in r]
    # the per-site record carries the count used and why it is not the claim (metrics.jsonl, the model card's data)
    assert [s for s in row["sites"].values() if "claimed 1e+09" in s.get("weight_reason", "") and
            s["num_examples"] < 1e9]
    from safetensors.numpy import load_file

    tensors = load_file(run_dir / "checkpoints" / "round-0001.safetensors")
    assert all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f")
    # The failing site's reason is in its own log and audit file, and nowhere on the coordinator's side.
    assert secret in (tmp_path / "logs" / "node-broken.log").read_text()
    audit = [json.loads(line) for line in (tmp_path / "audit" / "broken" / "outgoing.jsonl").read_text().splitlines()]
    assert audit and all(e["error"]["code"] == 5001 for e in audit) and secret in audit[0]["error"]["detail"]
    coordinator_side = [tmp_path / "logs" / "superlink.log", tmp_path / "logs" / "flwr-run.log",
                        *run_dir.rglob("*.json*")]
    for path in coordinator_side:
        assert secret not in path.read_text(errors="replace"), path


def test_node_killed_mid_round_then_rejoins(consortium, sites, tmp_path):
    """SIGKILL one of three nodes during round 1: the round completes with two; restarted, it takes part again."""
    consortium.start_link()
    for i, site in enumerate(sites):
        consortium.start_node(f"s{i}", site)
    run_dir = tmp_path / "run"

    import threading

    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", consortium.run(
        {"num-server-rounds": 3, "objective": "simclr", "run-dir": str(run_dir), "min-train-nodes": 2,
         "min-available-nodes": 2, "round-timeout": 90.0, "local-steps": 6})))
    runner.start()
    victim_log = tmp_path / "logs" / "node-s2.log"
    # Kill the node once it has received its first training message (its ClientApp is then running).
    wait_for(lambda: victim_log.exists() and re.search(r"Received|train", victim_log.read_text()) is not None,
              240, "node s2 to receive a training message")
    consortium.group.kill(consortium.nodes["s2"])
    wait_for(lambda: bool(read_metrics(run_dir)), 240, "round 1 to complete without s2")
    consortium.start_node("s2", sites[2])
    runner.join(timeout=500)
    assert result.get("code") == 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["sites_aggregated"] == 2
    assert all(r["aggregated"] for r in rows)
    assert max(r["sites_aggregated"] for r in rows[1:]) == 3, "the restarted node should take part again"


def test_coordinator_crash_and_resume(consortium, sites, tmp_path):
    """Kill the SuperLink after round 1; a restarted coordinator resumes and the run ends with all rounds."""
    consortium.start_link()
    for i, site in enumerate(sites[:2]):
        consortium.start_node(f"s{i}", site)
    run_dir = tmp_path / "run"

    import threading

    result: dict[str, int] = {}
    cfg = {"num-server-rounds": 3, "objective": "supcon", "run-dir": str(run_dir), "strategy": "fedadam"}
    runner = threading.Thread(target=lambda: result.setdefault("code", consortium.run(cfg)))
    runner.start()
    wait_for(lambda: (run_dir / "checkpoints" / "round-0001.safetensors").exists(), 300, "round 1 checkpoint")
    consortium.group.kill(consortium.link)
    runner.join(timeout=60)
    assert not (run_dir / "summary.json").exists()
    done = [r["round"] for r in read_metrics(run_dir)]
    assert done and done[-1] < 3
    first_key = json.loads((run_dir / "run.json").read_text())["run_key"]

    consortium.start_link()  # same port and database: the SuperNodes reconnect by themselves
    code = consortium.run(dict(cfg, resume=True))
    assert code == 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["sites_aggregated"] == 2 and r["aggregated"] for r in rows), rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["start_round"] == done[-1] + 1
    assert run_info["run_key"] == first_key  # the sites' sample-DP ledgers keep counting the same run


def test_byol_round_with_sample_dp(consortium, sites, tmp_path):
    """One BYOL round on real processes with dp=sample: each site trains the GroupNorm online network under
    opacus with its EMA target kept locally, and sends exactly the arrays the coordinator built."""
    consortium.start_link()
    for i, site in enumerate(sites[:2]):
        consortium.start_node(f"s{i}", site)
    run_dir = tmp_path / "run"
    code = consortium.run({"num-server-rounds": 1, "objective": "byol", "run-dir": str(run_dir), "dp": "sample",
                           "dp-noise": 1.0, "dp-clip": 1.0})
    assert code == 0
    (row,) = read_metrics(run_dir)
    assert row["sites_aggregated"] == 2 and np.isfinite(row["train_loss"]) and row["dp_epsilon"] > 0

    from fedrad.common.models import build_model
    from fedrad.common.packing import Layout

    layout = Layout.of(build_model("test_resnet", "byol", 32, proj_dim=32, norm="group").state_dict())
    assert any(k.startswith("predictor.") for k in layout.keys)
    model_shapes = {g: [n] for g, n in layout.groups.items()}  # packed: a target network would double the count
    for name in ("s0", "s1"):
        for line in (tmp_path / "audit" / name / "outgoing.jsonl").read_text().splitlines():
            for record in json.loads(line)["content"].values():
                if record["kind"] == "arrays":  # the online network only: no target network left the site
                    assert {k: v["shape"] for k, v in record["arrays"].items()} == model_shapes
