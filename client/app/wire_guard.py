"""The last thing every reply passes on its way out of a site: it enforces fedrad.common.protocol.

What may leave (anything else is replaced by a WIRE_BLOCKED error reply):
- a train reply: the model's own arrays in fedrad's wire format (fedrad.common.packing: one 1-D array per
  dtype), exactly the names, lengths and dtypes the coordinator sent (which the handler has already unpacked
  against the model its signed run config builds), and a MetricRecord of SiteReport train metrics (finite
  scalars under whitelisted keys);
- an evaluate reply: a MetricRecord of SiteReport evaluate metrics;
- a release reply (fedrad.common.release_wire): a MetricRecord holding one ReleaseCode;
- a SecAgg+ reply: exactly the records Flower's secaggplus_mod sends at the stage the coordinator asked
  for (public keys; encrypted key shares; masked integer vectors of the packed model's shapes plus the legacy
  FitRes metrics, checked as SiteReport; key shares for unmasking), each of the expected type and size;
- an error reply: only a code from ErrorCode and its fixed ERROR_TEXT. Any exception in a handler or mod
  becomes SITE_FAILED; the detailed reason goes to the site's log and audit file, never into the reply (a
  refusal's detail comes from fedrad.client.app.error_reply.refuse, the one way a site refuses).

Every outgoing message, error replies included, is described (names, shapes, dtypes, metric values; no
array contents) in `<audit-dir>/outgoing.jsonl` (node-config `audit-dir`), which hospital IT can read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from fedrad.client.app.error_reply import error_reply, pop_detail
from fedrad.common.atomic import append_private
from fedrad.common.protocol import (
    ARRAYS,
    ERROR_TEXT,
    FIT_PARAMS,
    FITRES_METRICS,
    FITRES_NUM_EXAMPLES,
    FITRES_PARAMS,
    FITRES_STATUS,
    MESSAGE_EVALUATE,
    MESSAGE_TRAIN,
    METRICS,
    SECAGG_RECORD,
    ErrorCode,
    ProtocolError,
    SiteReport,
    error_code_of,
    valid_example_count,
)
from fedrad.common.release_wire import MESSAGE_FILES, MESSAGE_OFFER, ReleaseWireError, reply_code

log = logging.getLogger("fedrad.client")

# Flower's SecAgg+ stage names and reply keys (flwr.common.secure_aggregation.secaggplus_constants).
_STAGE = "stage"
_SETUP, _SHARE_KEYS, _COLLECT, _UNMASK = "setup", "share_keys", "collect_masked_vectors", "unmask"
_MAX_KEY_BYTES = 512  # a serialised EC public key is ~100-200 bytes
_MAX_SHARE_BYTES = 4096  # an encrypted pair of Shamir shares (seed + private key) is well under this

@dataclass
class Expected:
    """What the coordinator's message allows in the reply, captured before the handlers run (secaggplus_mod
    pops the stage from the incoming message)."""

    message_type: str
    arrays: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    stage: str | None = None
    fit_shapes: list[tuple[int, ...]] = field(default_factory=list)
    peers: int = 0


def expected_reply(msg: Message) -> Expected:
    exp = Expected(str(msg.metadata.message_type))
    content = msg.content
    if ARRAYS in content.array_records:
        exp.arrays = {k: (tuple(a.shape), str(a.dtype)) for k, a in content.array_records[ARRAYS].items()}
    if SECAGG_RECORD in content.config_records:
        cfg = content.config_records[SECAGG_RECORD]
        exp.stage = str(cfg.get(_STAGE, ""))
        if FIT_PARAMS in content.array_records:  # legacy arrays carry no shape: read it from the data
            exp.fit_shapes = [tuple(a.numpy().shape) for a in content.array_records[FIT_PARAMS].values()]
        if exp.stage == _SHARE_KEYS:
            exp.peers = len([k for k in cfg if k != _STAGE])
        elif exp.stage == _UNMASK:
            exp.peers = sum(len(v) for k, v in cfg.items() if k != _STAGE and isinstance(v, list))
    return exp


def describe_content(msg: Message) -> dict[str, Any]:
    """A JSON-able description of a message's records: kinds, array names/shapes/dtypes, metric values."""
    out: dict[str, Any] = {}
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {
                "kind": "arrays",
                "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()},
            }
        elif isinstance(record, MetricRecord):
            out[name] = {"kind": "metrics", "values": {k: v for k, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            out[name] = {"kind": "config", "values": {k: repr(v)[:200] for k, v in record.items()}}
        else:
            out[name] = {"kind": type(record).__name__}
    return out


def check_outgoing(expected: Expected | Message, reply: Message) -> str | None:
    """Why `reply` may not leave the site under the protocol, or None. (A Message is read as the request.)"""
    exp = expected if isinstance(expected, Expected) else expected_reply(expected)
    try:
        if exp.stage is not None:
            _check_secagg(exp, reply)
        elif exp.message_type == MESSAGE_TRAIN:
            _check_records(reply, {ARRAYS: ArrayRecord, METRICS: MetricRecord})
            _check_arrays(reply.content.array_records[ARRAYS], exp.arrays)
            SiteReport.from_metrics(reply.content.metric_records[METRICS], MESSAGE_TRAIN)
        elif exp.message_type == MESSAGE_EVALUATE:
            _check_records(reply, {METRICS: MetricRecord})
            SiteReport.from_metrics(reply.content.metric_records[METRICS], MESSAGE_EVALUATE)
        elif exp.message_type in (MESSAGE_OFFER, MESSAGE_FILES):  # a release reply: one ReleaseCode
            _check_records(reply, {METRICS: MetricRecord})
            try:
                reply_code(reply.content.metric_records[METRICS])
            except ReleaseWireError as exc:
                raise ProtocolError(str(exc)) from None
        else:
            raise ProtocolError(f"no reply is allowed to a {exp.message_type!r} message")
    except ProtocolError as exc:
        return str(exc)
    return None


def _check_records(reply: Message, allowed: dict[str, type]) -> None:
    got = {name: type(record) for name, record in reply.content.items()}
    if set(got) != set(allowed):
        raise ProtocolError(f"reply records {sorted(got)} are not the expected {sorted(allowed)}")
    for name, kind in allowed.items():
        if got[name] is not kind:
            raise ProtocolError(f"record {name!r} is a {got[name].__name__}, expected {kind.__name__}")


def _check_arrays(record: ArrayRecord, allowed: dict[str, tuple[tuple[int, ...], str]]) -> None:
    if list(record.keys()) != list(allowed):
        extra = sorted(set(record.keys()) - set(allowed))[:3]
        raise ProtocolError(f"arrays are not the model's own (extra {extra}, {len(record)} vs {len(allowed)})")
    for key, arr in record.items():
        if (tuple(arr.shape), str(arr.dtype)) != allowed[key]:
            raise ProtocolError(f"array {key!r} is {tuple(arr.shape)} {arr.dtype}, the model's is {allowed[key]}")


_KEY, _INTS, _BLOBS = "public key", "list of int", "list of bytes"


def _config(reply: Message, keys: dict[str, str]) -> ConfigRecord:
    """The reply's SecAgg+ record, holding exactly `keys`, each of its kind (_KEY, _INTS or _BLOBS)."""
    cfg = reply.content.config_records[SECAGG_RECORD]
    if set(cfg.keys()) != set(keys):
        raise ProtocolError(f"SecAgg+ record keys {sorted(cfg.keys())} are not {sorted(keys)}")
    for key, kind in keys.items():
        value = cfg[key]
        if kind == _KEY:
            ok = type(value) is bytes and 0 < len(value) <= _MAX_KEY_BYTES
        else:
            element = int if kind == _INTS else bytes
            ok = isinstance(value, list) and all(type(v) is element for v in value)
        if not ok:
            raise ProtocolError(f"SecAgg+ {key!r} is not a {kind}")
    return cfg


def _check_secagg(exp: Expected, reply: Message) -> None:
    if exp.message_type != MESSAGE_TRAIN:
        raise ProtocolError("SecAgg+ records on a non-train message")
    if exp.stage == _COLLECT:
        _check_records(reply, {SECAGG_RECORD: ConfigRecord, FITRES_PARAMS: ArrayRecord,
                               FITRES_METRICS: ConfigRecord, FITRES_NUM_EXAMPLES: MetricRecord,
                               FITRES_STATUS: ConfigRecord})
        _check_masked_vectors(_config(reply, {"masked_params": _BLOBS}), exp.fit_shapes)
        content = reply.content
        if len(content.array_records[FITRES_PARAMS]) != 0:
            raise ProtocolError("SecAgg+ reply carries unmasked parameters")
        SiteReport.from_metrics(content.config_records[FITRES_METRICS], MESSAGE_TRAIN)
        n = content.metric_records[FITRES_NUM_EXAMPLES]
        if set(n.keys()) != {"num_examples"} or valid_example_count(n["num_examples"]) is None:
            raise ProtocolError("SecAgg+ reply's num_examples is not one positive whole number")
        status = dict(content.config_records[FITRES_STATUS])
        if status != {"code": 0, "message": ""}:
            raise ProtocolError("SecAgg+ reply's status is not a plain OK")
        return
    _check_records(reply, {SECAGG_RECORD: ConfigRecord})
    if exp.stage == _SETUP:
        _config(reply, {"pk1": _KEY, "pk2": _KEY})
    elif exp.stage in (_SHARE_KEYS, _UNMASK):
        ids, blobs = ("dsts", "ctxts") if exp.stage == _SHARE_KEYS else ("nids", "shares")
        cfg = _config(reply, {ids: _INTS, blobs: _BLOBS})
        if len(cfg[ids]) != len(cfg[blobs]) or len(cfg[ids]) > exp.peers:
            raise ProtocolError(f"SecAgg+ {exp.stage} reply has {len(cfg[ids])} entries for {exp.peers} peers")
        if any(len(b) > _MAX_SHARE_BYTES for b in cfg[blobs]):
            raise ProtocolError(f"SecAgg+ {exp.stage} reply holds an oversized share")
    else:
        raise ProtocolError(f"unknown SecAgg+ stage {exp.stage!r}")


def _check_masked_vectors(cfg: ConfigRecord, fit_shapes: list[tuple[int, ...]]) -> None:
    """Masked vectors: [weight factor (1,)] + one integer array per model array, of the model's shapes."""
    from flwr.common import bytes_to_ndarray

    blobs = cfg["masked_params"]
    shapes = [(1,), *fit_shapes]
    if len(blobs) != len(shapes):
        raise ProtocolError(f"SecAgg+ sends {len(blobs)} masked vectors, the model needs {len(shapes)}")
    for blob, shape in zip(blobs, shapes, strict=True):
        if len(blob) > 8 * max(1, _size(shape)) + 256:
            raise ProtocolError("SecAgg+ masked vector larger than its array")
        arr = bytes_to_ndarray(blob)
        if tuple(arr.shape) != shape or arr.dtype.kind not in "iu":
            raise ProtocolError(f"SecAgg+ masked vector {arr.shape} {arr.dtype} is not an integer {shape}")


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _audit(context: Context, msg: Message, exp: Expected, reply: Message, attempted: Message | None,
           blocked: str | None, detail: str | None) -> None:
    """One line per outgoing message; a blocked reply is described as attempted, beside the error sent."""
    audit_dir = context.node_config.get("audit-dir") or os.environ.get("FEDRAD_WIRE_AUDIT_DIR")
    if not audit_dir:
        return
    entry: dict[str, Any] = {
        "time": time.time(),
        "message_type": exp.message_type,
        "stage": exp.stage,
        "run_id": msg.metadata.run_id,
        "blocked": blocked,
        "content": describe_content(attempted or reply) if (attempted or not reply.has_error()) else {},
    }
    if reply.has_error():
        entry["error"] = {"code": int(reply.error.code), "reason": reply.error.reason, "detail": detail}
    append_private(Path(str(audit_dir)) / "outgoing.jsonl", json.dumps(entry) + "\n")


def wire_guard_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: run the app, enforce the protocol on the reply, audit what leaves."""
    exp = expected_reply(msg)
    blocked: str | None = None
    detail: str | None = None
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - any failure leaves as a bare code, never as exception text
        log.exception("handler failed on a %s message", exp.message_type)
        detail = f"{type(exc).__name__}: {exc}"
        reply = error_reply(msg, ErrorCode.SITE_FAILED)
    if reply.has_error():
        code = error_code_of(reply.error.code) or ErrorCode.SITE_FAILED
        detail = detail or pop_detail(msg.metadata.message_id) or (reply.error.reason or None)
        if reply.error.reason != ERROR_TEXT[code] or int(reply.error.code) != int(code):
            log.warning("rewriting an error reply (code %s) to the protocol's code %d", reply.error.code, code)
        reply = error_reply(msg, code)
    else:
        blocked = check_outgoing(exp, reply)
        if blocked is not None:
            log.error("wire guard blocked the reply to a %s message: %s", exp.message_type, blocked)
            attempted = reply
            reply = error_reply(msg, ErrorCode.WIRE_BLOCKED)
            _audit(context, msg, exp, reply, attempted, blocked, blocked)
            return reply
    _audit(context, msg, exp, reply, None, None, detail)
    return reply
