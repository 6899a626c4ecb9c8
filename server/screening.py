"""Screen site replies before aggregation: no single broken or lying site may wreck or own the model.

Every reply is parsed against fedrad.common.protocol (the coordinator does not trust a site's own guard):
error replies are recorded by code only; metrics must be SiteReport fields; arrays must be the global
model packed in fedrad's wire format (fedrad.common.packing: exactly its dtypes and lengths) and finite;
a kept reply's arrays are unpacked into the model's named arrays, which the strategies average. Then, across
the round:

- example counts (CountBounds): a claim that is not a finite positive whole number rejects the reply; a
  claim is cut to the maximum the operator declared for that enrolled site (run-config
  `site-max-examples`, a coordinator-side file), or, for a site with none, to `max_example_factor` x the
  round's (lower) median (nobody vouched for that count, so it may not outgrow the others); and every
  site's to `max_example_growth` x its own last accepted count in the run (its data does not double in a
  round). A declared site is never bounded by the others: a hospital 100x larger keeps its weight;
- weights: the aggregation weight (AGGREGATION_WEIGHT, the only key Flower's strategies weight by) is the
  validated count, or 1 for every site when the mean must be unweighted (dp=client), and no site without a
  declared maximum has a share of the total above `max_site_share` (shares above it are cut, the rest scale
  up; with fewer than 1/max_site_share sites every site gets the same weight);
- update norms (train): an update whose L2 distance to the global model is over `norm_factor` x the
  round's lower median is rejected.

Limits, stated: a norm rule only bounds how *far* an update moves the model. A site that flips the sign
of its update, or points it anywhere else, at a normal norm passes every norm rule; against that, the
weight and share caps bound its influence to its share, and a robust strategy (fedmedian, krum,
fedtrimmedavg; not available with SecAgg+) is the remedy. The median needs an honest majority of the
sites in a round. Claimed counts cannot be checked against the data: a declared site may lie up to its
declared maximum, never beyond it, growing at most max_example_growth x a round.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from fedrad.common.packing import Layout, PackingError, unpack
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
    max_example_factor: float = 1.5  # a site with no declared maximum: x the round's median; 0 disables
    max_example_growth: float = 2.0  # any site: x its own last accepted count in the run; 0 disables
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


def read_site_maxima(path: str | os.PathLike | None) -> dict[str, int]:
    """The operator's per-site maxima: a TOML file of `"site name" = max images` lines (enrolled names).
    ValueError naming the file and key for anything else (the ServerApp refuses to start)."""
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"site-max-examples {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    out = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"site-max-examples {path}: '{name}' must be a whole number of images >= 1")
        out[str(name)] = value
    return out


@dataclass
class CountBounds:
    """Per-site bounds on claimed example counts over a run. `declared`: the operator's maximum per enrolled
    site name; `names()` maps node id -> enrolled name; `last`: each site's last accepted count."""

    declared: dict[str, int] = field(default_factory=dict)
    names: Callable[[], Mapping[str, str]] = dict
    last: dict[int, int] = field(default_factory=dict)

    def bound(self, node: int, count: float, median: float, rules: ScreeningRules) -> tuple[float, str | None, bool]:
        """(count used, why it was changed or None, whether the operator declared this site's maximum).

        Declared: at most the declared maximum. Not declared: at most max_example_factor x the round's lower
        median (nobody vouched for the count, so it may not outgrow the others). Both: at most
        max_example_growth x the site's own last accepted count in this run."""
        name = self.names().get(str(node)) if self.declared else None
        vouched = name is not None and name in self.declared
        limit, why = None, None
        if vouched:
            limit, why = self.declared[name], f"the operator's maximum for {name}"
        elif rules.max_example_factor > 0:
            limit = rules.max_example_factor * median
            why = f"{rules.max_example_factor:g}x the round's median; no maximum declared for this site"
        used, reason = count, None
        if limit is not None and count > limit:
            used, reason = float(limit), why
        prev = self.last.get(node)
        if prev and rules.max_example_growth > 0 and used > math.ceil(rules.max_example_growth * prev):
            used = float(math.ceil(rules.max_example_growth * prev))
            reason = f"at most {rules.max_example_growth:g}x its last accepted count {prev}"
        if reason:
            reason = f"claimed {count:g} examples, counted as {used:g} ({reason})"
        return used, reason, vouched


def _check_arrays(arrays: Mapping[str, np.ndarray], reference: ArrayRecord, sink: BinaryIO | None = None
                  ) -> tuple[str | None, float]:
    """Return (reason to reject or None, L2 distance of the update from the global model).

    `arrays` are a reply's unpacked arrays (views into its packed buffers, already checked to be the global
    model's layout: fedrad.common.packing.unpack). One global array is decoded at a time, so checking a reply
    holds its packed buffers beside the global model, not a second copy; `sink` receives each checked array's
    bytes in the global model's order (UpdateSpill)."""
    sq = 0.0
    for key, ref_array in reference.items():
        arr = arrays[key]
        ref = ref_array.numpy()
        if arr.shape != ref.shape or arr.dtype != ref.dtype:  # unpack guarantees both; kept as a last check
            return f"'{key}' is {arr.shape} {arr.dtype}, expected {ref.shape} {ref.dtype}", 0.0
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                return f"'{key}' holds NaN or Inf", 0.0
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
        if sink is not None:
            np.ascontiguousarray(arr).tofile(sink)
    return None, float(np.sqrt(sq))


class UpdateSpill:
    """The round's checked updates on disk while replies stream in, so the coordinator holds one reply at a time.

    Which updates are accepted, and with what weight, is known only once every reply is in (the norm screen
    and the weight caps are relative to the round's medians); each update is therefore written, in the global
    model's array order, to one file in a private temporary folder (removed on `close`), and read back one
    array at a time when the screened mean is folded (GuardedAggregation.aggregate_screened).
    """

    def __init__(self, global_arrays: ArrayRecord, folder: str | os.PathLike | None = None) -> None:
        self.layout: dict[str, tuple[tuple[int, ...], np.dtype, int]] = {}  # key -> (shape, dtype, byte offset)
        offset = 0
        for key, arr in global_arrays.items():
            dtype = np.dtype(arr.dtype)
            self.layout[key] = (tuple(arr.shape), dtype, offset)
            offset += int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
        self.folder = Path(tempfile.mkdtemp(prefix="fedrad-updates-", dir=folder))

        self._files = 0

    def new_path(self) -> Path:
        self._files += 1
        return self.folder / f"update-{self._files}.bin"

    def read(self, path: Path, key: str) -> np.ndarray:
        """One array of the update in `path`, as the site sent it."""
        shape, dtype, offset = self.layout[key]
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> UpdateSpill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def error_summary(msg: Message) -> str:
    """An error reply as the coordinator records it: the code and the protocol's fixed text, never the
    reply's own reason (a site outside fedrad's guard could put anything there)."""
    code = error_code_of(msg.error.code)
    return f"error reply: code {int(msg.error.code)} ({ERROR_TEXT[code] if code else 'not a fedrad code'})"


def _parse(msg: Message, message_type: str, reference: ArrayRecord | None, layout: Layout | None,
           spill_path: Path | None = None
           ) -> tuple[str | None, SiteReport | None, float, dict[str, np.ndarray] | None]:
    """(reason to reject or None, parsed metrics, update norm, the reply's unpacked arrays when checked).
    `layout`: the reference's (fedrad.common.packing), derived once per round by the caller."""
    if msg.has_error():
        return error_summary(msg), None, 0.0, None
    if METRICS not in msg.content.metric_records:
        return "reply has no 'metrics' record", None, 0.0, None
    try:
        report = SiteReport.from_metrics(msg.content.metric_records[METRICS], message_type)
    except ProtocolError as exc:
        return str(exc), None, 0.0, None
    if valid_example_count(report.num_examples) is None:
        return f"example count {report.num_examples!r} is not a positive whole number", report, 0.0, None
    if reference is None:
        return None, report, 0.0, None
    if ARRAYS not in msg.content.array_records:
        return "reply has no 'arrays' record", report, 0.0, None
    try:
        arrays = unpack(msg.content.array_records[ARRAYS], layout)
    except PackingError as exc:
        return str(exc), report, 0.0, None
    if spill_path is None:
        reason, norm = _check_arrays(arrays, reference)
        return reason, report, norm, arrays
    with open(spill_path, "wb") as sink:
        reason, norm = _check_arrays(arrays, reference, sink)
    if reason:
        spill_path.unlink(missing_ok=True)
    return reason, report, norm, None


def lower_median(values: list[float]) -> float:
    """The lower median: with two sites the smaller value is the reference, so one wild value is caught."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def cap_shares(weights: dict[int, float], max_share: float, exempt: Iterable[int] = ()) -> dict[int, float]:
    """Cut the weights whose share of the total is over `max_share`, to exactly that share; `exempt` sites
    (an operator-declared maximum vouches for their size) are never cut but count in the total."""
    exempt = set(exempt) & set(weights)
    n = len(weights) - len(exempt)
    if n == 0 or max_share >= 1:
        return dict(weights)
    if not exempt and max_share * n <= 1:
        return {k: 1.0 for k in weights}  # no weighting satisfies the cap better than equal weights
    w = dict(weights)
    for _ in range(n):
        over = {k for k, v in w.items() if k not in exempt and v > max_share * sum(w.values()) * (1 + 1e-9)}
        if not over:
            break
        under = sum(v for k, v in w.items() if k not in over)
        level = max_share * under / (1 - max_share * len(over))  # solves level = share * (under + |over| level)
        for k in over:
            w[k] = level
    return w


@dataclass
class ScreenedUpdate:
    """An accepted train reply without its arrays (UpdateSpill holds them): what aggregation needs."""

    node: int
    metadata: Metadata
    metrics: dict[str, float]  # the aggregated metrics every accepted site sent, and AGGREGATION_WEIGHT
    weight: float
    path: Path | None  # the update's file in the round's UpdateSpill


def _screen(replies: Iterable[Message], global_arrays: ArrayRecord | None, rules: ScreeningRules,
            message_type: str, spill: UpdateSpill | None, bounds: CountBounds | None = None):
    """The one screening pass both entry points share: each reply is parsed and checked as it comes and the
    iterable's reference to it dropped, then the round-relative rules run on the small per-reply facts.
    Returns (candidates {node: (message or None, parsed, norm, spill path)}, report, with arrays)."""
    reference = global_arrays if message_type == MESSAGE_TRAIN and global_arrays is not None else None
    layout = Layout.of(reference) if reference is not None else None  # every reply must be exactly this
    report = ScreeningReport()
    candidates: dict[int, tuple[Message | None, SiteReport, float, Path | None]] = {}
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        path = spill.new_path() if spill is not None and reference is not None else None
        reason, parsed, norm, arrays = _parse(msg, message_type, reference, layout, path)
        if parsed is not None:
            report.reports[node] = parsed
        if reason:
            report.rejected[node] = reason
            continue
        if reference is not None:
            report.update_norms[node] = norm
        if spill is not None:
            msg = _bare(msg)
        elif arrays is not None:  # kept: the named arrays the strategy averages, not the packed ones
            msg = _bare(msg, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
        candidates[node] = (msg, parsed, norm, path)
        del msg, arrays
    if reference is not None and candidates and rules.norm_factor > 0:
        ref_norm = lower_median([c[2] for c in candidates.values()])
        for node, (_, _, norm, path) in list(candidates.items()):
            if ref_norm > 0 and norm > rules.norm_factor * ref_norm:
                report.rejected[node] = (f"update norm {norm:.3g} is over {rules.norm_factor:g}x the round's "
                                         f"median {ref_norm:.3g}")
                del candidates[node]
                if path is not None:
                    path.unlink(missing_ok=True)
    report.weights = _weights({n: float(c[1].num_examples) for n, c in candidates.items()}, rules, report, bounds)
    report.accepted = list(candidates)
    return candidates, report, reference is not None


def _bare(msg: Message, arrays: ArrayRecord | None = None) -> Message:
    """The reply's metadata without its content (its arrays are in the spill), or with only `arrays`."""
    return Message(content=RecordDict({ARRAYS: arrays} if arrays is not None else {}), metadata=msg.metadata)


def _metrics(parsed: SiteReport, weight: float, common: set[str]) -> dict[str, float]:
    metrics = {k: v for k, v in parsed.values(AGGREGATE).items() if k in common}
    metrics[AGGREGATION_WEIGHT] = float(weight)
    return metrics


def _common(candidates: dict) -> set[str]:
    if not candidates:
        return set()
    return set.intersection(*(set(c[1].values(AGGREGATE)) for c in candidates.values()))


def screen_replies(replies: Iterable[Message], global_arrays: ArrayRecord | None, rules: ScreeningRules,
                   message_type: str = MESSAGE_TRAIN, bounds: CountBounds | None = None
                   ) -> tuple[list[Message], ScreeningReport]:
    """Keep well-formed, non-outlier replies, rebuilt to hold only the arrays, the aggregated metrics and
    the coordinator's AGGREGATION_WEIGHT; say what was rejected or capped and why. Every round's path unless
    run-config spill-updates sends a mean strategy's replies through `screen_stream` instead."""
    candidates, report, with_arrays = _screen(replies, global_arrays, rules, message_type, None, bounds)
    common = _common(candidates)
    kept = []
    for node, (msg, parsed, _, _) in candidates.items():
        content = RecordDict({METRICS: MetricRecord(_metrics(parsed, report.weights[node], common))})
        if with_arrays:
            content[ARRAYS] = msg.content.array_records[ARRAYS]
        kept.append(Message(content=content, metadata=msg.metadata))
    return kept, report


def screen_stream(replies: Iterable[Message], global_arrays: ArrayRecord, rules: ScreeningRules,
                  spill: UpdateSpill, bounds: CountBounds | None = None
                  ) -> tuple[list[ScreenedUpdate], ScreeningReport]:
    """`screen_replies` for train replies that arrive one at a time: the same decisions, but each reply's
    arrays go to `spill` as they are checked and the reply is released before the next is read, so the
    coordinator holds about one update beside the global model however many sites answer."""
    candidates, report, _ = _screen(replies, global_arrays, rules, MESSAGE_TRAIN, spill, bounds)
    common = _common(candidates)
    return [ScreenedUpdate(node, msg.metadata, _metrics(parsed, report.weights[node], common),
                           report.weights[node], path)
            for node, (msg, parsed, _, path) in candidates.items()], report


def drain(items: list) -> Iterator:
    """Yield the list's items front to back, removing each first, so a consumer that drops its reference
    lets the item go (a reply list consumed by `screen_stream`)."""
    items.reverse()
    while items:
        yield items.pop()


def _weights(counts: dict[int, float], rules: ScreeningRules, report: ScreeningReport,
             bounds: CountBounds | None = None) -> dict[int, float]:
    """Each count within its site's bounds (CountBounds; a fresh one, without history, when none is kept),
    then the weights; a kept `bounds` remembers each count used as the site's last accepted count."""
    bounds = bounds if bounds is not None else CountBounds()
    median = lower_median(list(counts.values())) if counts else 0.0
    weights, declared = {}, set()
    for node, count in counts.items():
        weights[node], why, vouched = bounds.bound(node, count, median, rules)
        if why:
            report.capped[node] = why
        if vouched:
            declared.add(node)
    report.counted = {n: int(w) for n, w in weights.items()}
    bounds.last.update(report.counted)
    if rules.equal_weights:
        return {n: 1.0 for n in counts}
    shared = cap_shares(weights, rules.max_site_share, exempt=declared)
    before, after = sum(weights.values()), sum(shared.values())
    for node in weights:
        if shared[node] / after < weights[node] / before - 1e-9 and node not in report.capped:
            report.capped[node] = f"weight share cut to at most {rules.max_site_share:g} of the round"
    return shared
