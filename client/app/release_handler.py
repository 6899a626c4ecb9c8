"""The site's answers to release messages (fedrad.common.release_wire): an offer, then the bundle's files.

Both replies hold one number, a ReleaseCode. The bundle is verified with the consortium key the site's node
was started with (`fedrad node --consortium-key`, handed to the ClientApp by the runtime as node-config
`consortium-key`), never with anything the coordinator sends. A refusal is written with its reason to
`<audit>/refusals.jsonl`; the coordinator gets only the code. Imports stay light (no torch).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedrad.client.app.error_reply import refuse
from fedrad.client.site.release_store import (
    FILE_LIMITS,
    ReleaseQuota,
    ReleaseRefused,
    judge_offer,
    record_participation,
    store_release,
)
from fedrad.client.site.site_state import SiteState, SiteStateError, state_paths
from fedrad.common.bundle import CREATED_FORMAT
from fedrad.common.node_config import NodeConfig
from fedrad.common.protocol import CONFIG, METRICS, RUN_KEY
from fedrad.common.release_wire import (
    BUNDLE,
    OFFER_CREATED,
    OFFER_ID,
    OFFER_RUN_ID,
    OFFER_RUN_KEY,
    OFFER_SEQUENCE,
    RELEASE_CODE,
    ReleaseCode,
    ReleaseWireError,
    join_chunks,
)

log = logging.getLogger("fedrad.client.release")
CONSORTIUM_KEY = "consortium-key"  # node-config key the runtime sets from its own --consortium-key


def _reply(msg: Message, code: ReleaseCode) -> Message:
    return Message(RecordDict({METRICS: MetricRecord({RELEASE_CODE: int(code)})}), reply_to=msg)


def _refused(msg: Message, state: SiteState | None, code: ReleaseCode, detail: str) -> Message:
    """A refused release (fedrad.client.app.error_reply.refuse): audited, answered with its ReleaseCode alone."""
    return refuse(msg, code, f"release_{code.name.lower()}", detail, audit=state, reply=_reply(msg, code))


def _created(value: object) -> str:
    import time

    text = str(value)
    time.strptime(text, CREATED_FORMAT)  # ValueError for a claim that is not a UTC time
    return text


def handle_offer(msg: Message, context: Context) -> Message:
    """WANT when this site lacks the offered release and would take it; HAVE, or the refusal, otherwise."""
    state = state_paths(dict(context.node_config))
    try:
        cfg = msg.content.config_records[CONFIG]
        offered = str(cfg[OFFER_ID])
        sequence = int(cfg[OFFER_SEQUENCE])
        code = judge_offer(state, str(cfg[OFFER_RUN_ID]), str(cfg.get(OFFER_RUN_KEY, "") or ""), sequence,
                           _created(cfg[OFFER_CREATED]), offered,
                           ReleaseQuota.from_node_config(dict(context.node_config)))
    except (KeyError, TypeError, ValueError) as exc:
        return _refused(msg, state, ReleaseCode.REFUSED_MALFORMED, f"release offer: {type(exc).__name__}: {exc}")
    if code not in (ReleaseCode.WANT, ReleaseCode.HAVE):
        return _refused(msg, state, code, f"offered release {offered[:40]} (unsigned claim) declined")
    log.info("fedrad release: offered %s: %s", offered[:40], code.name)
    return _reply(msg, code)


def handle_files(msg: Message, context: Context) -> Message:
    """Verify the bundle with this site's consortium key and store it (temp, then rename), or refuse."""
    node_config = dict(context.node_config)
    state = state_paths(node_config)
    pubkey = NodeConfig.of(node_config).consortium_key
    if not pubkey:
        return _refused(msg, state, ReleaseCode.REFUSED_UNVERIFIED,
                        "this node has no consortium key to verify releases with (start it with --consortium-key)")
    try:
        record = msg.content.array_records[BUNDLE]
        pieces = {}
        for key, array in record.items():
            if str(array.dtype) != "uint8" or len(array.shape) != 1:
                raise ReleaseWireError(f"chunk {key[:60]!r} is not a 1-D uint8 array")
            pieces[key] = array.numpy().tobytes()
        files = join_chunks(pieces, FILE_LIMITS)
    except (KeyError, ReleaseWireError) as exc:
        return _refused(msg, state, ReleaseCode.REFUSED_MALFORMED, f"release files: {exc}")
    try:
        quota = ReleaseQuota.from_node_config(node_config)
    except ValueError as exc:  # a quota in node-config that is not a whole number: the site's own mistake
        return _refused(msg, state, ReleaseCode.FAILED, f"node-config release quota: {exc}")
    try:
        code, rid = store_release(state, files, pubkey, quota)
    except ReleaseRefused as exc:
        return _refused(msg, state, exc.code, str(exc))
    except (OSError, SiteStateError) as exc:
        return _refused(msg, state, ReleaseCode.FAILED, f"cannot store the release: {exc}")
    log.info("fedrad release: %s %s in %s", rid, code.name, state.root)
    return _reply(msg, code)


def note_training(msg: Message, reply: Message, context: Context) -> None:
    """After a successful training reply: remember the run (id and key), so its release is accepted later."""
    if reply.has_error():
        return
    cfg = msg.content.config_records.get(CONFIG)
    run_key = str(cfg.get(RUN_KEY, "") or "") if cfg is not None else ""
    try:
        record_participation(state_paths(dict(context.node_config)), msg.metadata.run_id, run_key or None)
    except (OSError, SiteStateError) as exc:  # training stands; only a later release of this run is refused
        log.error("fedrad release: cannot record taking part in run %s: %s", msg.metadata.run_id, exc)


__all__ = ["CONSORTIUM_KEY", "handle_files", "handle_offer", "note_training"]
