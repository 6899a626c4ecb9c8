"""The contract between a site and the coordinator: every key that crosses the wire, and what it may hold.

One place names the records, the message-config keys the coordinator sends, the metrics a site may send
back (`SiteReport`), and the error codes of a refusal. The site's wire guard, the trainer's reply, the
coordinator's reply check, the round loop's per-site record, SecAgg+ averaging and the plots all read
these names from here, so adding a metric is one edit: a new `SiteReport` field.

Naming: config keys (run-config and the message's ConfigRecord) are kebab-case, like Flower's own
`server-round`; metric keys and the fields of metrics.jsonl are snake_case, like Flower's legacy
`num_examples`. Flower's Message strategies read the weighting key from `weighted_by_key` (default
"num-examples"); fedrad sets it to AGGREGATION_WEIGHT, a key only the coordinator writes.

Error replies carry only a code from this fixed table and its fixed text: the real reason (paths, column
names, exception text) stays in the site's own log and audit file, never in the reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Why a site did not return a result. Stable numbers: the coordinator logs and stores only these."""

    POLICY_REFUSED = 4001  # the run breaks the site's policy (see the site's audit log for the rule)
    RUN_NOT_SIGNED = 4002  # the run's code is not signed by the consortium key the site trusts
    PRIVACY_BUDGET = 4003  # the site's own privacy budget would be exceeded by this round
    WIRE_BLOCKED = 4004  # the reply broke the wire protocol and was blocked at the site
    PROTOCOL_MISMATCH = 4005  # the coordinator's message does not match the run-config (e.g. SecAgg+ on/off)
    RUN_REPLAYED = 4011  # the signed run's nonce was already used by another Flower run at this site
    RUN_EXPIRED = 4012  # the signed run's not-after time passed before it started here
    RUN_OUT_OF_BOUNDS = 4013  # a message type or server-round the signed run does not allow
    SITE_FAILED = 5001  # the site failed while handling the message (details in its own log)
    DATA_UNAVAILABLE = 5002  # the site has no usable data for this run


ERROR_TEXT: dict[ErrorCode, str] = {
    ErrorCode.POLICY_REFUSED: "refused by site policy",
    ErrorCode.RUN_NOT_SIGNED: "run not signed by the consortium",
    ErrorCode.PRIVACY_BUDGET: "site privacy budget exhausted",
    ErrorCode.WIRE_BLOCKED: "reply blocked by the site's wire guard",
    ErrorCode.PROTOCOL_MISMATCH: "message does not match the run's protocol settings",
    ErrorCode.RUN_REPLAYED: "signed run already used by another run",
    ErrorCode.RUN_EXPIRED: "signed run expired",
    ErrorCode.RUN_OUT_OF_BOUNDS: "message not allowed by the signed run",
    ErrorCode.SITE_FAILED: "site failed while handling the message",
    ErrorCode.DATA_UNAVAILABLE: "site data unavailable",
}


def error_code_of(code: int) -> ErrorCode | None:
    """The protocol code of an error reply, or None for a code outside the table (e.g. Flower's own)."""
    try:
        return ErrorCode(int(code))
    except ValueError:
        return None


# --- records of a message ------------------------------------------------------------------------------
# Flower's Message strategies use "arrays" and "config" (arrayrecord_key / configrecord_key); replies use
# "arrays" and "metrics". Nothing else crosses the wire in plain mode.
ARRAYS = "arrays"  # ArrayRecord: the model packed by fedrad.common.packing (coordinator <-> site)
CONFIG = "config"  # ConfigRecord of MESSAGE_CONFIG keys (coordinator -> site)
METRICS = "metrics"  # MetricRecord of SiteReport fields (site -> coordinator)

MESSAGE_TRAIN = "train"
MESSAGE_EVALUATE = "evaluate"


@dataclass(frozen=True)
class ConfigKey:
    """A key of the ConfigRecord the coordinator sends with a message."""

    name: str
    kind: type
    rule: str
    sender: str


# The coordinator -> site message config. Kebab-case (Flower injects `server-round` itself).
SERVER_ROUND = "server-round"
RUN_KEY = "run-key"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
ROUND_LR = "round-lr"
MESSAGE_CONFIG: dict[str, ConfigKey] = {k.name: k for k in (
    ConfigKey(SERVER_ROUND, int, ">= 0", "coordinator (Flower strategies inject it into train and evaluate)"),
    ConfigKey(RUN_KEY, str, "1-64 characters of [A-Za-z0-9._-] (else refused); an unsigned label the site "
              "stores, never a key of its ledger",
              "coordinator, train messages (plain mode)"),
    ConfigKey(ROUND_LR, float, "the signed run config's schedule at this round; a site refuses any other value",
              "coordinator, train messages (plain mode; under SecAgg+ the site computes it from the run config)"),
    ConfigKey(SECAGG_MAX_WEIGHT, float, "> 0; the most weight a site may give its masked update",
              "coordinator, SecAgg+ FitIns config"),
)}

# The coordinator-only weighting key: Flower's strategies average with it (`weighted_by_key`). Sites never
# send it (the wire guard blocks it); the coordinator writes it after validating the site's example count.
AGGREGATION_WEIGHT = "aggregation_weight"

# Flower's SecAgg+ record (flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS) and the
# legacy FitIns/FitRes records (flwr.compat.common.recorddict_compat) fedrad's SecAgg+ path uses.
SECAGG_RECORD = "secaggplus_configs"
FIT_PARAMS = "fitins.parameters"
FIT_CONFIG = "fitins.config"
FITRES_PARAMS = "fitres.parameters"
FITRES_METRICS = "fitres.metrics"  # a ConfigRecord in Flower's legacy format: values checked as SiteReport
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_STATUS = "fitres.status"


# --- what a site reports -------------------------------------------------------------------------------
# Readers of a metric (a SiteReport field's metadata "readers"):
SITE_RECORD = "site_record"  # kept per site in metrics.jsonl ("sites": {node: {...}})
AGGREGATE = "aggregate"  # weighted mean over sites on the round's line (plain and SecAgg+ alike)
PLOT = "plot"  # drawn per round by run_log.plot_run
MANIFEST = "manifest"  # read by the release manifest (server/release.py)
MONITOR = "monitor"  # mean over sites weighted by probe_examples on the round's line; the plot's AUC panel


def _metric(kind: type, messages: tuple[str, ...], readers: tuple[str, ...], doc: str) -> Any:
    return field(default=None, metadata={"kind": kind, "messages": messages, "readers": readers, "doc": doc})


_T, _E, _TE = (MESSAGE_TRAIN,), (MESSAGE_EVALUATE,), (MESSAGE_TRAIN, MESSAGE_EVALUATE)
# The held-out metrics are also allowed in train replies: with run-config eval-in-train a site measures the
# received global weights before training and sends them with its update (client/app/task.py handle_train).


@dataclass(frozen=True)
class SiteReport:
    """Everything a site may send besides the model's arrays: finite scalars, one field per metric.

    client/app/task.py fills it, `to_metrics` makes the MetricRecord; the wire guard and the coordinator parse
    replies back with `from_metrics`, which refuses unknown keys, lists, strings and non-finite numbers.
    """

    num_examples: int | None = _metric(int, _TE, (SITE_RECORD, MANIFEST), "images at the site (claimed)")
    train_loss: float | None = _metric(float, _T, (SITE_RECORD, AGGREGATE, PLOT), "mean of the last 3 steps")
    train_loss_first: float | None = _metric(float, _T, (SITE_RECORD, AGGREGATE), "loss of the first step")
    examples_seen: int | None = _metric(int, _T, (SITE_RECORD, MANIFEST), "images drawn in local steps")
    steps: int | None = _metric(int, _T, (SITE_RECORD, MANIFEST), "local optimizer steps")
    images_pending: int | None = _metric(int, _T, (SITE_RECORD,), "files found, not decoded yet (fedrad ingest)")
    seconds: float | None = _metric(float, _T, (SITE_RECORD, AGGREGATE), "wall time of the handler")
    train_seconds: float | None = _metric(float, _T, (AGGREGATE,), "wall time of the local steps")
    dp_epsilon: float | None = _metric(float, _T, (SITE_RECORD, PLOT, MANIFEST), "site's image-level ε so far")
    dp_epsilon_next: float | None = _metric(float, _T, (SITE_RECORD,), "ε after one more round")
    eval_loss: float | None = _metric(float, _TE, (SITE_RECORD, AGGREGATE, PLOT), "held-out contrastive loss")
    alignment: float | None = _metric(float, _TE, (SITE_RECORD, AGGREGATE), "held-out alignment")
    uniformity: float | None = _metric(float, _TE, (SITE_RECORD, AGGREGATE), "held-out uniformity")
    eval_examples: int | None = _metric(int, _TE, (SITE_RECORD,), "held-out images evaluated")
    # The representation monitor (run-config probe-monitor, client/app/probe_monitor.py): AUCs over the site's
    # labelled images, never a label or a per-image value.
    knn_auc: float | None = _metric(float, _TE, (SITE_RECORD, MONITOR), "cosine k-NN AUC, patient splits")
    probe_auc: float | None = _metric(float, _TE, (SITE_RECORD, MONITOR), "linear-probe AUC, patient splits")
    probe_examples: int | None = _metric(int, _TE, (SITE_RECORD,), "labelled images the monitor embedded")

    def to_metrics(self) -> dict[str, int | float]:
        """The MetricRecord content: set fields only, in their declared kind."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = f.metadata["kind"](value)
        return out

    @classmethod
    def from_metrics(cls, values: Mapping[str, Any], message_type: str) -> SiteReport:
        """Parse a reply's metrics; raise ProtocolError naming the key that breaks the protocol."""
        specs = metric_specs()
        parsed: dict[str, int | float] = {}
        for key, value in values.items():
            spec = specs.get(key)
            if spec is None or message_type not in spec.messages:
                raise ProtocolError(f"metric key {str(key)[:40]!r} is not in the protocol for {message_type} replies")
            parsed[key] = _scalar(key, value, spec.kind)
        return cls(**parsed)

    def values(self, reader: str) -> dict[str, int | float]:
        """The set fields a reader uses (e.g. SITE_RECORD for metrics.jsonl's per-site record)."""
        specs = metric_specs()
        return {k: v for k, v in self.to_metrics().items() if reader in specs[k].readers}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: type
    messages: tuple[str, ...]
    readers: tuple[str, ...]
    doc: str


class ProtocolError(ValueError):
    """A message breaks the protocol; the text names the key and stays where it was raised (never sent)."""


def metric_specs() -> dict[str, MetricSpec]:
    """Every metric a site may send, from SiteReport's fields."""
    return {f.name: MetricSpec(f.name, f.metadata["kind"], f.metadata["messages"], f.metadata["readers"],
                               f.metadata["doc"]) for f in fields(SiteReport)}


def metrics_for(reader: str) -> tuple[str, ...]:
    """Names of the metrics a reader uses, in declaration order."""
    return tuple(name for name, spec in metric_specs().items() if reader in spec.readers)


def _scalar(key: str, value: Any, kind: type) -> int | float:
    """A finite int/float of the declared kind (an int is a whole number; bool and lists are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"metric {key!r} is a {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise ProtocolError(f"metric {key!r} is not finite")
    if kind is int:
        if float(value) != int(value):
            raise ProtocolError(f"metric {key!r} must be a whole number")
        return int(value)
    return float(value)


def valid_example_count(value: Any) -> int | None:
    """A claimed example count as a positive int, or None when it is not one (NaN, inf, <= 0, fraction)."""
    try:
        count = _scalar("num_examples", value, int)
    except ProtocolError:
        return None
    return count if count > 0 else None
