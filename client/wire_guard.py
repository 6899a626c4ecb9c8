"""A Flower mod that checks, and can log, everything a site sends back to the coordinator.

Only two kinds of content may leave a site: the model's arrays (same names and shapes as the arrays the
coordinator sent) and numeric metrics. A reply holding anything else (a ConfigRecord, a string, an array
of a new shape such as an image) is replaced by an error reply, so nothing leaks even through a bug.
With node-config `audit-dir`, each outgoing message is described (names, shapes, dtypes, metric values;
no array contents) in `<audit-dir>/outgoing.jsonl`, which hospital IT can read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

# Flower's SecAgg+ protocol record (flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS):
# masked integer vectors and public keys, produced by Flower's own mod.
_SECAGG_KEY = "secaggplus_configs"


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


def check_outgoing(incoming: Message, reply: Message) -> str | None:
    """Return why `reply` may not leave the site, or None if it holds only model arrays and numbers."""
    allowed_shapes: dict[str, tuple[int, ...]] = {}
    for record in incoming.content.array_records.values():
        for key, arr in record.items():
            allowed_shapes[key] = tuple(arr.shape)
    for name, record in reply.content.items():
        if isinstance(record, MetricRecord):
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, int | float) for v in values):
                    return f"metric '{key}' is not numeric"
        elif isinstance(record, ArrayRecord):
            for key, arr in record.items():
                if key not in allowed_shapes:
                    return f"array '{name}/{key}' is not one of the model's arrays"
                if tuple(arr.shape) != allowed_shapes[key]:
                    return f"array '{name}/{key}' has shape {tuple(arr.shape)}, model has {allowed_shapes[key]}"
        elif isinstance(record, ConfigRecord) and name == _SECAGG_KEY:
            continue  # SecAgg+ protocol messages: masked integer vectors and public keys, Flower's own
        else:
            return f"record '{name}' of kind {type(record).__name__} may not leave the site"
    return None


def wire_guard_mod(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    why = check_outgoing(msg, reply)
    audit_dir = context.node_config.get("audit-dir") or os.environ.get("FEDRAD_WIRE_AUDIT_DIR")
    if audit_dir:
        entry = {
            "time": time.time(),
            "message_type": msg.metadata.message_type,
            "run_id": msg.metadata.run_id,
            "blocked": why,
            "content": describe_content(reply),
        }
        path = Path(str(audit_dir))
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "outgoing.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    if why is not None:
        return Message(Error(code=403, reason=f"fedrad wire guard blocked the reply: {why}"), reply_to=msg)
    return reply
