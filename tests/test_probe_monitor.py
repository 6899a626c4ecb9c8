"""The representation monitor on real decoded DICOMs: it sees an easy label and not a shuffled one, only its two
AUCs and an image count leave a site (and only where the site's policy lists the column), and the coordinator
averages them by images, capped, into the round's line and plot."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.app.probe_monitor import measure, monitor_set
from fedrad.client.app.wire_guard import wire_guard_mod
from fedrad.client.site.site_data import SiteData, load_site
from fedrad.common.protocol import (
    MESSAGE_EVALUATE,
    MESSAGE_TRAIN,
    MONITOR,
    ErrorCode,
    ProtocolError,
    SiteReport,
    metric_specs,
    metrics_for,
)
from fedrad.common.run_config import RunConfig

MONITOR_KEYS = {"knn_auc", "probe_auc", "probe_examples"}
RUN = {"model": "test_resnet", "objective": "simclr", "image-size": 32, "proj-dim": 32, "batch-size": 8}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("monitor-sites")
    return write_synthetic_sites(root, n_sites=3, patients_per_site=24, images_per_patient=(1, 3), size=48, seed=2)


@pytest.fixture(scope="module")
def pooled(sites, tmp_path_factory) -> SiteData:
    """Site A's and site C's decoded images as one set, labelled by the hospital they came from: a label any
    backbone sees (exposure, noise, aspect differ), on real DICOM decodes."""
    root = tmp_path_factory.mktemp("monitor-cache")
    a, c = (load_site(s, 32, cache_dir=root / s.name, progress=False, state_dir=root / "state")
            for s in (sites[0], sites[2]))
    return SiteData(images=np.concatenate([a.images, c.images]), paths=a.paths + c.paths,
                    patient_keys=a.patient_keys + c.patient_keys,
                    labels={"origin": ["a"] * len(a) + ["c"] * len(c)}, image_size=32)


def _backbone():
    import torch

    from fedrad.common.models import build_model

    torch.manual_seed(0)
    return build_model("test_resnet", "simclr", 32, proj_dim=32).backbone


def test_easy_label_scores_near_one_and_a_shuffled_label_near_one_half(pooled):
    backbone = _backbone()
    chosen = monitor_set(pooled, "origin", 512)
    scores = measure(backbone.train(), pooled, chosen)
    assert backbone.training, "the monitor restores the module's mode"
    assert scores["probe_examples"] == len(pooled) and set(scores) == MONITOR_KEYS
    assert scores["knn_auc"] > 0.95 and scores["probe_auc"] > 0.95
    # The same images and backbone, each patient's label drawn at random: nothing to find.
    groups = pooled.group_ids()
    rng = np.random.default_rng(0)
    draw = {g: str(rng.integers(0, 2)) for g in np.unique(groups)}
    pooled.labels["shuffled"] = [draw[g] for g in groups]
    shuffled = measure(backbone, pooled, monitor_set(pooled, "shuffled", 512))
    assert 0.3 < shuffled["knn_auc"] < 0.7 and 0.3 < shuffled["probe_auc"] < 0.7, shuffled


def test_image_cap_keeps_whole_patients_and_the_same_images_every_time(pooled):
    chosen = monitor_set(pooled, "origin", 20)
    assert 8 <= len(chosen.idx) <= 20
    groups = pooled.group_ids()
    for g in np.unique(chosen.groups):
        assert set(np.flatnonzero(groups == g)) <= set(chosen.idx.tolist()), "a patient is never split"
    assert np.array_equal(chosen.idx, monitor_set(pooled, "origin", 20).idx)


def test_no_number_without_two_classes_or_enough_images(pooled):
    assert "no label column" in monitor_set(pooled, "finding", 512)
    one_class = SiteData(pooled.images, pooled.paths, pooled.patient_keys, {"x": ["1"] * len(pooled)})
    assert "one class" in monitor_set(one_class, "x", 512)
    other = SiteData(pooled.images, pooled.paths, pooled.patient_keys, {"x": ["PA"] * len(pooled)})
    assert "one class" in monitor_set(other, "x", 512)
    unknown = SiteData(pooled.images, pooled.paths, pooled.patient_keys,
                       {"sex": ["unknown"] * (len(pooled) - 3) + ["M", "F", "M"]})  # header unknowns: unlabelled
    assert "at least 8" in monitor_set(unknown, "sex", 512)


def test_the_wire_lets_exactly_the_monitors_numbers_through():
    """The protocol's whole metric whitelist, and what the monitor may add to a train or evaluate reply."""
    assert set(metric_specs()) == {
        "num_examples", "train_loss", "train_loss_first", "examples_seen", "steps", "images_pending", "seconds",
        "train_seconds",
        "dp_epsilon", "dp_epsilon_next", "eval_loss", "alignment", "uniformity", "eval_examples", *MONITOR_KEYS}
    assert set(metrics_for(MONITOR)) == {"knn_auc", "probe_auc"}
    values = {"num_examples": 40, "knn_auc": 0.7, "probe_auc": 0.65, "probe_examples": 40}
    for message_type in (MESSAGE_EVALUATE, MESSAGE_TRAIN):
        assert SiteReport.from_metrics(values, message_type).to_metrics() == values
    for bad in ({"knn_auc": [0.7, 0.2]}, {"knn_auc": float("nan")}, {"probe_examples": 3.5},
                {"knn_scores": 0.7}, {"probe_labels": 1.0}, {"knn_auc_finding": 0.7}):
        with pytest.raises(ProtocolError):
            SiteReport.from_metrics({"num_examples": 40, **bad}, MESSAGE_EVALUATE)


def _evaluate_through_the_guard(tmp_path, site, run: dict, policy: str | None):
    from fedrad.client.app.task import _RESIDENT, handle_evaluate
    from fedrad.common.models import build_model
    from fedrad.common.packing import pack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # as inside a ClientApp process
    cfg = RunConfig.from_flower(run)
    node_config = {"data-dir": str(site), "cache-dir": str(tmp_path / "cache"), "state-dir": str(tmp_path / "state"),
                   "audit-dir": str(tmp_path / "audit"), "device": "cpu", **({"policy": policy} if policy else {})}
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(run))
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim)
    msg = Message(content=RecordDict({"arrays": pack(model.state_dict()),  # the wire's packed format
                                      "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    try:
        reply = wire_guard_mod(msg, ctx, handle_evaluate)
    finally:
        _RESIDENT.clear()
    assert not reply.has_error()
    return dict(reply.content.metric_records["metrics"])


def test_evaluate_reply_carries_the_monitor_only_where_the_site_allows_it(tmp_path, sites):
    """Site B (half its patients positive) through the real handler and wire guard: the AUCs and the count leave
    when the run asks for `finding` and the site's policy lists it; nothing with the built-in policy or with the
    monitor off."""
    policy = tmp_path / "site.toml"
    policy.write_text('[training]\nlabel_fields = ["view", "sex", "finding"]\n')
    run = dict(RUN, **{"probe-monitor": "finding"})
    sent = _evaluate_through_the_guard(tmp_path, sites[1], run, str(policy))
    assert MONITOR_KEYS <= set(sent) and 0.0 <= sent["knn_auc"] <= 1.0 and 0.0 <= sent["probe_auc"] <= 1.0
    assert sent["probe_examples"] == sent["num_examples"]  # every image of site B is labelled, under the cap
    assert not MONITOR_KEYS & set(_evaluate_through_the_guard(tmp_path, sites[1], run, None))
    assert not MONITOR_KEYS & set(_evaluate_through_the_guard(tmp_path, sites[1], RUN, str(policy)))


def test_a_reply_with_more_than_the_monitors_numbers_is_blocked(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = Context(run_id=1, node_id=1, node_config={"audit-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    per_image = {f"knn_score_{i}": 0.5 for i in range(3)}
    reply = wire_guard_mod(msg, ctx, lambda m, c: Message(RecordDict({"metrics": MetricRecord(
        {"num_examples": 12, "knn_auc": 0.8, "probe_examples": 12, **per_image})}), reply_to=m))
    assert reply.has_error() and reply.error.code == ErrorCode.WIRE_BLOCKED


def test_run_config_checks_the_monitor_keys():
    assert RunConfig.from_flower({"probe-monitor": "finding", "probe-monitor-images": "64"}).probe_monitor_images == 64
    assert RunConfig().probe_monitor == ""  # off by default
    assert RunConfig(objective="simclr", probe_monitor="view").probe_monitor == "view"  # simclr ignores labels
    for bad, words in (({"probe-monitor-images": 8}, "'probe-monitor-images'"),
                       ({"probe-monitor-images": 10_000}, "'probe-monitor-images'"),
                       ({"probe-monitor": "finding,view"}, "'probe-monitor'"),
                       ({"probe-monitor": "view", "objective": "supcon"}, "label-fields"),
                       ({"probe-monitor": "finding", "objective": "simsiam", "dp": "sample"}, "epsilon"),
                       ({"probe-monitor-images": "many"}, "'probe-monitor-images'")):
        with pytest.raises(ValueError, match=words):
            RunConfig.from_flower(bad)


def test_coordinator_weights_the_monitor_by_images_capped_and_skips_rejected_sites():
    from fedrad.server.rounds import monitor_means

    sites = {"1": {"knn_auc": 0.9, "probe_auc": 0.8, "probe_examples": 100},
             "2": {"knn_auc": 0.5, "probe_examples": 300},  # no probe AUC from this site
             "3": {"knn_auc": 0.1, "probe_auc": 0.1, "probe_examples": 1_000_000},  # claims far over the cap
             "4": {"knn_auc": 0.0, "probe_auc": 0.0, "probe_examples": 50},  # its update was rejected
             "5": {"train_loss": 1.0}}  # monitor off at this site
    out = monitor_means(sites, {"4"}, cap=512)
    assert out["knn_auc"] == pytest.approx((0.9 * 100 + 0.5 * 300 + 0.1 * 512) / 912)
    assert out["probe_auc"] == pytest.approx((0.8 * 100 + 0.1 * 512) / 612)
    assert out["probe_examples"] == 912 and out["monitor_sites"] == 3
    assert monitor_means({"1": {"train_loss": 1.0}}, set(), 512) == {}


def test_plot_shows_the_aucs_beside_the_loss():
    import matplotlib

    matplotlib.use("Agg")
    from fedrad.server.run_log import run_figure

    rows = [{"round": r, "train_loss": 2.0 - 0.1 * r, "knn_auc": 0.6 + 0.05 * r, "probe_auc": 0.55 + 0.05 * r,
             "sites": {"11": {"train_loss": 2.0}}} for r in (1, 2, 3)]
    fig = run_figure(rows)
    assert len(fig.axes) == 3
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == [
        "k-NN AUC (weighted mean)", "linear-probe AUC (weighted mean)"]
    assert list(fig.axes[1].lines[0].get_ydata()) == pytest.approx([0.65, 0.7, 0.75])
    assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()] == ["site 1"]
