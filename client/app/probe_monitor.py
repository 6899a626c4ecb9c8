"""The representation monitor: how well the received backbone's features separate a site's own labels.

A contrastive loss can fall while the features stay useless for diagnosis. With run-config `probe-monitor`
naming a label column (e.g. "finding" from the site's labels.csv, or a header field such as "view"), every
evaluation at the site (the evaluate message, or the train reply under eval-in-train) embeds up to
`probe-monitor-images` labelled images with the received backbone, frozen, and measures
- `knn_auc`: cosine k-NN (k = 20, at most a third of the training side): a test image's score is each class's
  share among its nearest training images;
- `probe_auc`: the fine-tuning linear probe (client/tools/finetune: fit_linear, macro AUC);
both on the same PROBE_SPLITS fixed patient-level 70/30 splits (patient_split: no patient on both sides),
averaged.
Only those two AUCs and `probe_examples` (how many images were embedded) leave the site; the labels, the
features and any per-image value stay here. A site decides itself: the column must be among its policy's
`label_fields` (the coordinator cannot pick a column of the site's CSV), else the site measures nothing.

Which images: every labelled image, not only the training hold-out (10 % of the patients, too few for an AUC
at a small site); the self-supervised objectives never see these labels, and the run config refuses a
monitor column that SupCon trains on. The images are whole patients drawn in a fixed order, so each round
measures the same images and the numbers move only when the backbone does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrad.common.header_signals import UNKNOWN

if TYPE_CHECKING:
    from torch import nn

    from fedrad.client.site.site_data import SiteData
    from fedrad.common.run_config import RunConfig

log = logging.getLogger("fedrad.client")

KNN_K = 20
PROBE_SPLITS = 5  # patient-level splits both AUCs average over (fixed seeds: the same splits every round)
MIN_IMAGES = 8  # fewer labelled images give no number at all
EMBED_CHUNK = 64  # images decoded to float and embedded at once
SELECTION_SEED = 4321  # the fixed patient order the image cap draws from


@dataclass(frozen=True)
class MonitorSet:
    """The labelled images the monitor embeds: indices into the SiteData, binary targets [N, T], patient ids."""

    idx: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    targets: list[str]


def monitor_set(data: SiteData, column: str, max_images: int) -> MonitorSet | str:
    """The images and targets for `column`, whole patients up to `max_images`; or why there are none."""
    from fedrad.client.evaluation.data import binarise

    if column not in data.labels:
        return f"this site has no label column {column!r}"
    values = ["" if v == UNKNOWN else v for v in data.labels[column]]  # a header field's unknown: unlabelled
    try:
        y, targets, mask = binarise({column: values})
    except ValueError:
        return f"label column {column!r} has only one class here"
    labelled = np.flatnonzero(mask)
    groups = data.group_ids()
    patients = np.unique(groups[labelled])
    np.random.default_rng(SELECTION_SEED).shuffle(patients)
    members = {int(p): labelled[groups[labelled] == p] for p in patients}
    chosen: list[np.ndarray] = []
    total = 0
    for p in patients:
        part = members[int(p)]
        if total + len(part) > max_images:
            continue  # a patient that does not fit whole is left out, never split
        chosen.append(part)
        total += len(part)
    idx = np.sort(np.concatenate(chosen)) if chosen else labelled[:0]
    if len(idx) < MIN_IMAGES:
        return f"{len(idx)} labelled images for {column!r} (at least {MIN_IMAGES} needed)"
    y = y[idx]
    if not ((y > 0.5).any(axis=0) & (y < 0.5).any(axis=0)).any():
        return f"the labelled images hold only one class of {column!r}"
    return MonitorSet(idx, y, groups[idx], targets)


def patient_splits(groups: np.ndarray, y: np.ndarray,
                   splits: int = PROBE_SPLITS) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fine-tuning 70/30 patient split (patient_split) for seeds 0..splits-1, fixed so that every round
    scores the same images; a split whose training side lacks a class of the first target is left out."""
    from fedrad.client.evaluation.splits import patient_split

    out = []
    for seed in range(splits):
        train, test = patient_split(groups, y, seed=seed)
        if len(train) and len(test) and len(np.unique(y[train, 0])) == 2:
            out.append((train, test))
    return out


def knn_auc(features: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = KNN_K) -> float:
    """Mean macro AUC of cosine k-NN over the patient splits: a test image's score for a class is that class's
    share among its k most similar training images (never its own patient's). nan when no split has one.

    A split rather than leave-one-patient-out: leaving a patient out shifts its neighbours' class shares against
    its own label, which drags a label-blind backbone well below 0.5 when k is a large part of the site."""
    from fedrad.client.evaluation.metrics import macro_auc

    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    aucs = []
    for train, test in patient_splits(groups, y):
        kk = min(k, max(1, len(train) // 3))  # at most a third of the bank, else every score is its class share
        sim = unit[test] @ unit[train].T
        nearest = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        aucs.append(macro_auc(y[test], y[train][nearest].mean(axis=1)))
    return _mean(aucs)


def probe_auc(features: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Mean macro AUC of the fine-tuning linear probe (fit_linear) over the patient splits (nan when none)."""
    from fedrad.client.evaluation.heads import fit_linear
    from fedrad.client.evaluation.metrics import macro_auc

    return _mean([macro_auc(y[test], fit_linear(features[train], y[train], features[test], seed=seed))
                  for seed, (train, test) in enumerate(patient_splits(groups, y))])


def _mean(aucs: list[float]) -> float:
    finite = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(finite)) if finite else float("nan")


def measure(backbone: nn.Module, data: SiteData, chosen: MonitorSet, device: str = "cpu") -> dict[str, float]:
    """SiteReport fields (knn_auc, probe_auc, probe_examples) of the frozen `backbone` on `chosen`; an AUC
    that is undefined here is left out ({} when both are). The module's train/eval mode is restored afterwards."""
    from fedrad.client.evaluation.heads import embed_images

    was_training = backbone.training
    try:  # a chunk of images at a time: memory stays bounded whatever probe-monitor-images and the image size
        features = np.concatenate([
            embed_images(backbone, data.as_float(chosen.idx[i:i + EMBED_CHUNK]).numpy()[:, 0], None, device)
            for i in range(0, len(chosen.idx), EMBED_CHUNK)])
    finally:
        backbone.train(was_training)
    out: dict[str, float] = {}
    for key, value in (("knn_auc", knn_auc(features, chosen.y, chosen.groups)),
                       ("probe_auc", probe_auc(features, chosen.y, chosen.groups))):
        if math.isfinite(value):
            out[key] = value
    return {**out, "probe_examples": float(len(chosen.idx))} if out else {}


def site_monitor(model: nn.Module, data: SiteData, cfg: RunConfig, node_config: Mapping[str, Any],
                 device: str, server_round: int) -> dict[str, float]:
    """The monitor's SiteReport fields for this message, {} when the run has it off, the site's policy does not
    list the column, or the site's labels give no AUC (each said in one line of the site's log)."""
    if not cfg.probe_monitor:
        return {}
    from fedrad.client.site.policy import policy_for
    from fedrad.client.training.trainer import resolve_device

    column = cfg.probe_monitor
    if column not in policy_for(dict(node_config)).label_fields:
        log.info("round %s probe monitor: label column %r is not in this site's policy label_fields; not measured",
                 server_round, column)
        return {}
    chosen = monitor_set(data, column, cfg.probe_monitor_images)
    if isinstance(chosen, str):
        log.info("round %s probe monitor: %s; not measured", server_round, chosen)
        return {}
    t0 = time.perf_counter()
    scores = measure(model.backbone, data, chosen, str(resolve_device(device)))
    if not scores:
        log.info("round %s probe monitor on %r: no AUC on %d images (no patient split has both classes on each "
                 "side); not sent", server_round, column, len(chosen.idx))
        return {}
    log.info("round %s probe monitor on %r: k-NN AUC %s, linear-probe AUC %s on %d images of %d patients, %.1f s",
             server_round, column, _fmt(scores.get("knn_auc")), _fmt(scores.get("probe_auc")), len(chosen.idx),
             len(np.unique(chosen.groups)), time.perf_counter() - t0)
    return scores


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


__all__ = ["KNN_K", "MonitorSet", "PROBE_SPLITS", "knn_auc", "measure", "monitor_set", "probe_auc", "site_monitor"]
