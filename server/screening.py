"""Screen site replies before aggregation: no single broken or lying site may wreck or own the model.

Every reply is parsed against fedrad.common.protocol (the coordinator does not trust a site's own guard):
error replies are recorded by code only; metrics must be SiteReport fields; arrays must be the global
model's names, shapes and dtypes and finite. Then, across the round:

- example counts: a claim that is not a finite positive whole number rejects the reply; a claim above
  `max_example_factor` x the round's (lower) median is cut down to that;
- weights: the aggregation weight (AGGREGATION_WEIGHT, the only key Flower's strategies weight by) is the
  validated count, or 1 for every site when the mean must be unweighted (dp=client), and no site's share
  of the total exceeds `max_site_share` (shares above it are cut, the rest scale up; with fewer than
  1/max_site_share sites every site gets the same weight);
- update norms (train): an update whose L2 distance to the global model is over `norm_factor` x the
  round's lower median is rejected.

Limits, stated: a norm rule only bounds how *far* an update moves the model. A site that flips the sign
of its update, or points it anywhere else, at a normal norm passes every norm rule; against that, the
weight and share caps bound its influence to its share, and a robust strategy (fedmedian, krum,
fedtrimmedavg; not available with SecAgg+) is the remedy. The median needs an honest majority of the
sites in a round. Claimed counts cannot be checked against the data; the cap is relative to the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedrad.common.protocol import (
    AGGREGATE,
    AGGREGATION_WEIGHT,
    ARRAYS,
    ERROR_TEXT,
    MESSAGE_TRAIN,
    METRICS,
    ProtocolError,
    SiteReport,
    error_code_of,
    valid_example_count,
)


@dataclass(frozen=True)
class ScreeningRules:
    norm_factor: float = 3.0  # 0 disables the norm screen
    max_example_factor: float = 1.5  # 0 disables the count cap
    max_site_share: float = 0.5  # 1 disables the share cap
    equal_weights: bool = False  # dp=client: the DP noise is calibrated to an unweighted mean


@dataclass
class ScreeningReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    update_norms: dict[int, float] = field(default_factory=dict)
    reports: dict[int, SiteReport] = field(default_factory=dict)  # parsed metrics of every well-formed reply
    weights: dict[int, float] = field(default_factory=dict)  # the weight each accepted site aggregated with
    counted: dict[int, int] = field(default_factory=dict)  # each accepted site's example count after the cap
    capped: dict[int, str] = field(default_factory=dict)  # why a site's weight was cut


def _check_arrays(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """Return (reason to reject or None, L2 distance of the update from the global model)."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = set(reference) - set(arrays.keys())
        extra = set(arrays.keys()) - set(reference)
        return f"array names differ (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})", 0.0
    sq = 0.0
    for key, ref in reference.items():
        arr = arrays[key].numpy()
        if arr.shape != ref.shape:
            return f"'{key}' has shape {arr.shape}, expected {ref.shape}", 0.0
        if arr.dtype != ref.dtype:
            return f"'{key}' has dtype {arr.dtype}, expected {ref.dtype}", 0.0
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                return f"'{key}' holds NaN or Inf", 0.0
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return None, float(np.sqrt(sq))


def error_summary(msg: Message) -> str:
    """An error reply as the coordinator records it: the code and the protocol's fixed text, never the
    reply's own reason (a site outside fedrad's guard could put anything there)."""
    code = error_code_of(msg.error.code)
    return f"error reply: code {int(msg.error.code)} ({ERROR_TEXT[code] if code else 'not a fedrad code'})"


def _parse(msg: Message, message_type: str, reference: dict[str, np.ndarray] | None
           ) -> tuple[str | None, SiteReport | None, float]:
    if msg.has_error():
        return error_summary(msg), None, 0.0
    if METRICS not in msg.content.metric_records:
        return "reply has no 'metrics' record", None, 0.0
    try:
        report = SiteReport.from_metrics(msg.content.metric_records[METRICS], message_type)
    except ProtocolError as exc:
        return str(exc), None, 0.0
    if valid_example_count(report.num_examples) is None:
        return f"example count {report.num_examples!r} is not a positive whole number", report, 0.0
    if reference is None:
        return None, report, 0.0
    if ARRAYS not in msg.content.array_records:
        return "reply has no 'arrays' record", report, 0.0
    reason, norm = _check_arrays(msg.content.array_records[ARRAYS], reference)
    return reason, report, norm


def lower_median(values: list[float]) -> float:
    """The lower median: with two sites the smaller value is the reference, so one wild value is caught."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def cap_shares(weights: dict[int, float], max_share: float) -> dict[int, float]:
    """Cut the weights whose share of the total is over `max_share`, to exactly that share."""
    n = len(weights)
    if n == 0 or max_share >= 1:
        return dict(weights)
    if max_share * n <= 1:
        return {k: 1.0 for k in weights}  # no weighting satisfies the cap better than equal weights
    w = dict(weights)
    for _ in range(n):
        over = {k for k, v in w.items() if v > max_share * sum(w.values()) * (1 + 1e-9)}
        if not over:
            break
        under = sum(v for k, v in w.items() if k not in over)
        level = max_share * under / (1 - max_share * len(over))  # solves level = share * (under + |over| level)
        for k in over:
            w[k] = level
    return w


def screen_replies(replies: list[Message], global_arrays: ArrayRecord | None, rules: ScreeningRules,
                   message_type: str = MESSAGE_TRAIN) -> tuple[list[Message], ScreeningReport]:
    """Keep well-formed, non-outlier replies, rebuilt to hold only the arrays, the aggregated metrics and
    the coordinator's AGGREGATION_WEIGHT; say what was rejected or capped and why."""
    reference = None
    if message_type == MESSAGE_TRAIN and global_arrays is not None:
        reference = {k: v.numpy() for k, v in global_arrays.items()}
    report = ScreeningReport()
    candidates: dict[int, tuple[Message, SiteReport, float]] = {}
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        reason, parsed, norm = _parse(msg, message_type, reference)
        if parsed is not None:
            report.reports[node] = parsed
        if reason:
            report.rejected[node] = reason
            continue
        if reference is not None:
            report.update_norms[node] = norm
        candidates[node] = (msg, parsed, norm)
    if reference is not None and candidates and rules.norm_factor > 0:
        ref_norm = lower_median([n for _, _, n in candidates.values()])
        for node, (_, _, norm) in list(candidates.items()):
            if ref_norm > 0 and norm > rules.norm_factor * ref_norm:
                report.rejected[node] = (f"update norm {norm:.3g} is over {rules.norm_factor:g}x the round's "
                                         f"median {ref_norm:.3g}")
                del candidates[node]
    report.weights = _weights({n: float(r.num_examples) for n, (_, r, _) in candidates.items()}, rules, report)
    kept = [_rebuild(msg, parsed, report.weights[node], reference is not None, candidates)
            for node, (msg, parsed, _) in candidates.items()]
    report.accepted = list(candidates)
    return kept, report


def _weights(counts: dict[int, float], rules: ScreeningRules, report: ScreeningReport) -> dict[int, float]:
    weights = dict(counts)
    if counts and rules.max_example_factor > 0:
        limit = rules.max_example_factor * lower_median(list(counts.values()))
        for node, count in counts.items():
            if count > limit:
                weights[node] = limit
                report.capped[node] = f"claimed {count:g} examples, counted as {limit:g} " \
                                      f"({rules.max_example_factor:g}x the round's median)"
    report.counted = {n: int(w) for n, w in weights.items()}
    if rules.equal_weights:
        return {n: 1.0 for n in counts}
    shared = cap_shares(weights, rules.max_site_share)
    before, after = sum(weights.values()), sum(shared.values())
    for node in weights:
        if shared[node] / after < weights[node] / before - 1e-9 and node not in report.capped:
            report.capped[node] = f"weight share cut to at most {rules.max_site_share:g} of the round"
    return shared


def _rebuild(msg: Message, parsed: SiteReport, weight: float, with_arrays: bool,
             candidates: dict[int, tuple[Message, SiteReport, float]]) -> Message:
    """The reply as the strategy sees it: arrays, the aggregated metrics every kept site sent, the weight."""
    common = set.intersection(*(set(r.values(AGGREGATE)) for _, r, _ in candidates.values()))
    metrics = {k: v for k, v in parsed.values(AGGREGATE).items() if k in common}
    metrics[AGGREGATION_WEIGHT] = float(weight)
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if with_arrays:
        content[ARRAYS] = msg.content.array_records[ARRAYS]
    return Message(content=content, metadata=msg.metadata)
