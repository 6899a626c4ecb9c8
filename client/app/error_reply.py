"""The one way a site says no: `refuse` logs the rule and its detail, writes them to the site's own
`<audit>/refusals.jsonl`, and replies with a protocol code and its fixed text, nothing else.

The runtime (unsigned run, bad claims, crashed app), the site policy mod, the privacy mods, the train handler
(DP budget) and the release handler all refuse through it, so no path can put site text (paths, counts,
exception messages) into the `reason` field that crosses the wire, and every refusal is audited the same way.
The wire guard (client/app/wire_guard.py, outermost mod) copies the detail into its outgoing.jsonl line
(`pop_detail`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.app.error import Error

from fedrad.client.site.site_state import REFUSALS_FILE  # the one place that names the site's files
from fedrad.common.protocol import ERROR_TEXT, ErrorCode

log = logging.getLogger("fedrad.client.refusal")

# Details of refusals made in this process, by message id, for the wire guard's audit line (never sent). A
# refusal whose reply does not pass the wire guard (the runtime's) leaves its detail here: bounded.
_DETAILS: dict[str, str] = {}
_MAX_DETAILS = 256


def error_reply(msg: Message, code: ErrorCode) -> Message:
    """A reply to `msg` holding only `code` and ERROR_TEXT[code] (fedrad.common.protocol)."""
    return Message(Error(code=int(code), reason=ERROR_TEXT[code]), reply_to=msg)


def refuse(msg: Message, code: int, rule: str, detail: str, *, audit: Any = None,
           entry: Mapping[str, Any] | None = None, reply: Message | None = None) -> Message:
    """Refuse `msg`: log `rule` and `detail`, append them to the site's refusals file, reply with `code` alone.

    audit: where refusals.jsonl is: a SiteState (its audit folder), a node-config mapping (`audit-dir`), a
      folder, or None (the log and the wire guard's outgoing line only).
    entry: the audit line (default: rule, detail, message type, run id and the code sent); "time" is added.
    reply: the reply to send instead of the error reply (a release refusal answers with its ReleaseCode).
    An audit folder that cannot be written is logged: it never turns a refusal into something else.
    """
    message_type, run_id = str(msg.metadata.message_type), int(msg.metadata.run_id)
    log.warning("fedrad: refused %s message of run %s: rule %s: %s", message_type, run_id, rule, detail)
    if reply is None:
        if len(_DETAILS) >= _MAX_DETAILS:
            _DETAILS.pop(next(iter(_DETAILS)))
        _DETAILS[msg.metadata.message_id] = detail
    line = dict(entry) if entry is not None else {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rule": rule, "detail": detail,
        "message_type": message_type, "run_id": run_id, "reply": {"error_code": int(code)}}
    audit_refusal(audit, line)
    return reply if reply is not None else error_reply(msg, ErrorCode(int(code)))


def pop_detail(message_id: str) -> str | None:
    """The detail of this process's refusal of message `message_id` (once), for the wire guard's audit line."""
    return _DETAILS.pop(message_id, None)


def refusals_path(audit: Any) -> Path | None:
    """`<audit folder>/refusals.jsonl` of a SiteState, a node-config mapping or a folder; None when unknown."""
    if audit is None:
        return None
    if hasattr(audit, "audit_dir"):
        return Path(audit.audit_dir) / REFUSALS_FILE
    if isinstance(audit, Mapping):
        folder = audit.get("audit-dir")
        return Path(str(folder)) / REFUSALS_FILE if folder else None
    return Path(os.fspath(audit)) / REFUSALS_FILE


def audit_refusal(audit: Any, entry: Mapping[str, Any]) -> None:
    """Append one refusal line (0600) to the refusals file of `audit` (see `refuse`); an OSError is logged."""
    path = refusals_path(audit)
    if path is None:
        return
    from fedrad.common.atomic import append_private

    try:
        append_private(path, json.dumps({"time": time.time(), **entry}) + "\n")
    except OSError as exc:
        log.error("fedrad: cannot write the refusal audit %s: %s", path, exc)


__all__ = ["REFUSALS_FILE", "audit_refusal", "error_reply", "pop_detail", "refuse", "refusals_path"]
