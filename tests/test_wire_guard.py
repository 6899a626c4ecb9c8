"""The site's wire guard on real Flower messages: only the protocol leaves, errors leave as bare codes,
every outgoing message is audited. SecAgg+ replies come from Flower's own secaggplus_mod."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.app.error_reply import refuse
from fedrad.client.app.wire_guard import wire_guard_mod
from fedrad.common.packing import pack
from fedrad.common.protocol import ERROR_TEXT, ErrorCode, SiteReport, metric_specs, metrics_for

SECRET = "/data/hospital/hiv_status.csv"


@pytest.fixture(autouse=True)
def _inside_clientapp():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as inside a ClientApp process


def _model(w_shape: tuple[int, ...] = (3, 2), w_dtype=np.float32) -> dict[str, np.ndarray]:
    return {"w": np.ones(w_shape, w_dtype), "n": np.array(4, np.int64)}


def _arrays() -> ArrayRecord:
    """The model in fedrad's wire format: one flat array per dtype (fedrad.common.packing)."""
    return pack(_model())


def _incoming(message_type: str = MessageType.TRAIN, secagg: dict | None = None) -> Message:
    content = RecordDict({"arrays": _arrays(), "config": ConfigRecord({"server-round": 1})})
    if secagg is not None:
        content = RecordDict({"secaggplus_configs": ConfigRecord(secagg)})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def _ctx(tmp_path, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config={"audit-dir": str(tmp_path)}, state=RecordDict(),
                   run_config=run_config or {})


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "outgoing.jsonl").read_text().splitlines()]


def _train_reply(msg: Message, metrics: dict | None = None, arrays: ArrayRecord | None = None, **extra) -> Message:
    good = SiteReport(num_examples=12, train_loss=1.5, steps=3).to_metrics()
    content = RecordDict({"arrays": arrays or _arrays(), "metrics": MetricRecord(metrics or good), **extra})
    return Message(content=content, reply_to=msg)


def _run(tmp_path, handler, msg: Message | None = None) -> Message:
    msg = msg or _incoming()
    return wire_guard_mod(msg, _ctx(tmp_path), handler)


def test_protocol_reply_passes_and_is_audited(tmp_path):
    reply = _run(tmp_path, lambda m, c: _train_reply(m))
    assert not reply.has_error()
    (entry,) = _audit(tmp_path)
    assert entry["blocked"] is None and entry["content"]["metrics"]["values"]["num_examples"] == 12


@pytest.mark.parametrize("why, make", [
    ("list-valued metric", lambda m: _train_reply(m, {"num_examples": 12, "train_loss": [0.1] * 4096})),
    ("unknown key", lambda m: _train_reply(m, {"num_examples": 12, "lesion_volume": 3.0})),
    ("string smuggled in a key", lambda m: _train_reply(m, {"num_examples": 12, "patient=DOE^JANE": 1.0})),
    ("non-finite metric", lambda m: _train_reply(m, {"num_examples": 12, "train_loss": float("nan")})),
    ("fractional count", lambda m: _train_reply(m, {"num_examples": 12.5})),
    ("coordinator-only weight", lambda m: _train_reply(m, {"num_examples": 12, "aggregation_weight": 1e9})),
    ("extra config record", lambda m: _train_reply(m, note=ConfigRecord({"name": "DOE^JANE"}))),
    ("extra array", lambda m: _train_reply(m, arrays=ArrayRecord({**{k: v for k, v in _arrays().items()},
                                                                  "img": Array(np.zeros((64, 64), np.float32))}))),
    ("packed array of the wrong length", lambda m: _train_reply(m, arrays=pack(_model((4, 2))))),
    ("packed array of the wrong dtype", lambda m: _train_reply(m, arrays=pack(_model(w_dtype=np.float64)))),
    ("packed groups out of order", lambda m: _train_reply(m, arrays=ArrayRecord(
        {"int64": Array(np.array([4], np.int64)), "float32": Array(np.ones(6, np.float32))}))),
    ("the arrays unpacked", lambda m: _train_reply(m, arrays=ArrayRecord(
        {k: Array(v) for k, v in _model().items()}))),
    ("metrics smuggled as a secagg record", lambda m: _train_reply(
        m, secaggplus_configs=ConfigRecord({"pk1": b"x", "note": "DOE^JANE"}))),
])
def test_what_breaks_the_protocol_is_blocked(tmp_path, why, make):
    reply = _run(tmp_path, lambda m, c: make(m))
    assert reply.has_error(), why
    assert reply.error.code == ErrorCode.WIRE_BLOCKED and reply.error.reason == ERROR_TEXT[ErrorCode.WIRE_BLOCKED]
    (entry,) = _audit(tmp_path)
    assert entry["blocked"] and entry["error"]["code"] == ErrorCode.WIRE_BLOCKED
    assert entry["content"], "the audit describes what was attempted"


def test_evaluate_reply_may_hold_no_arrays(tmp_path):
    msg = _incoming(MessageType.EVALUATE)
    ok = _run(tmp_path, lambda m, c: Message(RecordDict({"metrics": MetricRecord(
        SiteReport(num_examples=3, eval_loss=2.0).to_metrics())}), reply_to=m), msg)
    assert not ok.has_error()
    msg = _incoming(MessageType.EVALUATE)
    leaked = _run(tmp_path, lambda m, c: _train_reply(m), msg)
    assert leaked.error.code == ErrorCode.WIRE_BLOCKED  # train metrics and arrays on an evaluate reply


def test_exception_text_never_leaves(tmp_path):
    def boom(m, c):
        raise ValueError(f"label column 'hiv_status' missing in {SECRET}")

    reply = _run(tmp_path, boom)
    assert reply.error.code == ErrorCode.SITE_FAILED and reply.error.reason == ERROR_TEXT[ErrorCode.SITE_FAILED]
    assert SECRET not in reply.error.reason
    (entry,) = _audit(tmp_path)
    assert SECRET in entry["error"]["detail"]  # hospital IT sees why, in its own audit file


def test_error_replies_are_rewritten_to_protocol_codes(tmp_path):
    foreign = _run(tmp_path, lambda m, c: Message(Error(code=429, reason=f"epsilon 8.65 > 8 at {SECRET}"), reply_to=m))
    assert foreign.error.code == ErrorCode.SITE_FAILED and SECRET not in foreign.error.reason
    texted = _run(tmp_path, lambda m, c: Message(Error(code=int(ErrorCode.PRIVACY_BUDGET), reason=SECRET),
                                                 reply_to=m))
    assert texted.error.code == ErrorCode.PRIVACY_BUDGET
    assert texted.error.reason == ERROR_TEXT[ErrorCode.PRIVACY_BUDGET]
    coded = _run(tmp_path, lambda m, c: refuse(m, ErrorCode.PRIVACY_BUDGET, "budget",
                                                  f"epsilon 8.65 > budget 8 ({SECRET})"))
    assert coded.error.code == ErrorCode.PRIVACY_BUDGET and SECRET not in coded.error.reason
    entries = _audit(tmp_path)
    assert len(entries) == 3 and SECRET in entries[2]["error"]["detail"]


_SETUP = {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 1.0,
          "target_range": 2**20, "mod_range": 2**30, "max_weight": 1000.0}


def test_real_secaggplus_setup_reply_passes_and_tampered_ones_are_blocked(tmp_path):
    from flwr.client.mod import secaggplus_mod

    ctx = _ctx(tmp_path)
    reply = wire_guard_mod(_incoming(secagg=dict(_SETUP)), ctx, lambda m, c: secaggplus_mod(m, c, None))
    assert not reply.has_error()
    assert set(reply.content.config_records["secaggplus_configs"].keys()) == {"pk1", "pk2"}

    def tampered(m, c):
        out = secaggplus_mod(m, c, None)
        out.content.config_records["secaggplus_configs"]["pk2"] = [b"a", b"b"]  # wrong type
        return out

    bad = wire_guard_mod(_incoming(secagg=dict(_SETUP)), _ctx(tmp_path), tampered)
    assert bad.error.code == ErrorCode.WIRE_BLOCKED

    def smuggled(m, c):
        out = secaggplus_mod(m, c, None)
        out.content["metrics"] = MetricRecord({"num_examples": 5})  # nothing but keys at this stage
        return out

    assert wire_guard_mod(_incoming(secagg=dict(_SETUP)), _ctx(tmp_path), smuggled).has_error()


def test_secagg_stage_error_from_flower_leaves_as_a_code(tmp_path):
    """Flower's secaggplus_mod raises (with its own text) on a stage out of order: a bare code leaves."""
    from flwr.client.mod import secaggplus_mod

    reply = wire_guard_mod(_incoming(secagg={"stage": "unmask", "active_nids": [1], "dead_nids": []}),
                           _ctx(tmp_path), lambda m, c: secaggplus_mod(m, c, None))
    assert reply.error.code == ErrorCode.SITE_FAILED and reply.error.reason == ERROR_TEXT[ErrorCode.SITE_FAILED]


def test_masked_vectors_must_have_the_models_shapes(tmp_path):
    from flwr.common import ndarray_to_bytes

    from fedrad.client.app.wire_guard import Expected, check_outgoing

    exp = Expected(MessageType.TRAIN, stage="collect_masked_vectors", fit_shapes=[(3, 2), ()])

    def collect_reply(blobs, metrics=None):
        content = RecordDict({
            "secaggplus_configs": ConfigRecord({"masked_params": blobs}),
            "fitres.parameters": ArrayRecord(),
            "fitres.metrics": ConfigRecord(metrics or {"train_loss": 1.0}),
            "fitres.num_examples": MetricRecord({"num_examples": 12}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""}),
        })
        return Message(content=content, reply_to=_incoming())

    # The expected shapes come from the legacy FitIns the coordinator sent (its Arrays carry no shape).
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedrad.client.app.wire_guard import expected_reply

    fitins = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.ones((3, 2)), np.array(1.0)]), {}), True)
    fitins["secaggplus_configs"] = ConfigRecord({"stage": "collect_masked_vectors", "ctxts": [], "srcs": []})
    assert expected_reply(Message(fitins, dst_node_id=1, message_type=MessageType.TRAIN)).fit_shapes == exp.fit_shapes

    good = [ndarray_to_bytes(np.array(a, dtype=np.int64)) for a in (np.zeros(1), np.zeros((3, 2)), np.array(0))]
    assert check_outgoing(exp, collect_reply(good)) is None
    image = [good[0], ndarray_to_bytes(np.zeros((64, 64), np.int64)), good[2]]
    assert "masked vector" in check_outgoing(exp, collect_reply(image))
    assert check_outgoing(exp, collect_reply(good, {"train_loss": 1.0, "who": "DOE^JANE"})) is not None
    assert check_outgoing(exp, collect_reply(good[:2])) is not None


def test_every_metric_has_a_kind_a_message_and_a_reader():
    specs = metric_specs()
    assert "num_examples" in specs and all(s.kind in (int, float) for s in specs.values())
    assert all(s.messages and s.readers for s in specs.values())
    assert all(name == name.lower() and "-" not in name for name in specs)  # snake_case metrics
    assert "train_loss" in metrics_for("aggregate") and "dp_epsilon" in metrics_for("site_record")
