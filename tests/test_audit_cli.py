"""`fedrad audit` at a site: what left the node per run and per day (messages, arrays, metrics, ε), refusals of
both line formats by rule and code, releases received; ISO times; JSON; bad input in one line."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedrad.client.app.error_reply import audit_refusal
from fedrad.client.app.wire_guard import describe_content
from fedrad.client.site.site_state import SiteState
from fedrad.common.protocol import ErrorCode
from fedrad.deploy.audit_command import audit_summary
from fedrad.deploy.cli import main

DAY = 86_400.0
T0 = 1_764_979_200.0  # 2025-12-06T00:00:00Z


def _outgoing(state: SiteState, t: float, run_id: int, kind: str, eps: float | None = None, error: int | None = None,
              blocked: str | None = None) -> None:
    """One line as the wire guard writes it (its own describe_content for the records)."""
    metrics = {"train_loss": 1.5, "num_examples": 40} | ({"dp_epsilon": eps} if eps is not None else {})
    records = {"metrics": MetricRecord(metrics)}
    if kind == "train":
        records["arrays"] = ArrayRecord({"conv.weight": Array(np.zeros((4, 1, 3, 3), np.float32)),
                                         "fc.bias": Array(np.zeros(8, np.float32))})
    content = {} if error else describe_content(SimpleNamespace(content=RecordDict(records)))
    entry = {"time": t, "message_type": kind, "stage": None, "run_id": run_id, "blocked": blocked, "content": content}
    if error:
        entry["error"] = {"code": error, "reason": "", "detail": "x"}
    state.audit_dir.mkdir(parents=True, exist_ok=True)
    with open(state.audit_dir / "outgoing.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


@pytest.fixture
def state(tmp_path):
    s = SiteState(root=tmp_path / "state", audit_dir=tmp_path / "state" / "audit")
    _outgoing(s, T0 + 10, 7, "train", eps=0.4)
    _outgoing(s, T0 + 20, 7, "evaluate")
    _outgoing(s, T0 + DAY + 10, 7, "train", eps=0.9)
    _outgoing(s, T0 + DAY + 20, 8, "train", error=int(ErrorCode.POLICY_REFUSED))
    with open(s.audit_dir / "outgoing.jsonl", "a") as fh:
        fh.write('{"time": 1, "cut by a cra')  # a line cut by a crash
    for _ in range(2):  # the line fedrad.client.app.error_reply.refuse writes for a policy refusal
        audit_refusal(s, {"rule": "training.max_rounds_per_day", "detail": "3 rounds in 24 h", "message_type": "train",
                          "run_id": 8, "reply": {"error_code": int(ErrorCode.POLICY_REFUSED)}})
    audit_refusal({"audit-dir": str(s.audit_dir)}, {"event": "refused", "code": int(ErrorCode.RUN_NOT_SIGNED),
                                                     "reason": "no signature", "run_id": 9, "message_type": "train"})
    return s


def test_what_left_per_run_and_per_day(state):
    s = audit_summary(state)
    runs = {r["run_id"]: r for r in s["by_run"]}
    assert runs["7"]["messages"] == 3 and runs["7"]["train"] == 2 and runs["7"]["evaluate"] == 1
    assert runs["7"]["arrays"] == 4 and runs["7"]["array_values"] == 2 * (36 + 8)
    assert runs["7"]["metrics"] == 3 + 2 + 3 and runs["7"]["epsilon"] == 0.9
    assert runs["7"]["first"] == "2025-12-06T00:00:10Z" and runs["7"]["last"] == "2025-12-07T00:00:10Z"
    assert runs["8"]["error_replies"] == 1 and runs["8"]["arrays"] == 0
    assert [(d["day"], d["messages"]) for d in s["by_day"]] == [("2025-12-06", 2), ("2025-12-07", 2)]
    assert s["outgoing"]["messages"] == 4


def test_refusals_of_both_formats_by_rule_and_code(state):
    ref = audit_summary(state)["refusals"]
    assert ref["total"] == 3
    assert ref["by_rule"] == {"training.max_rounds_per_day": 2, "runtime: refused": 1}
    assert ref["by_code"] == {"4001 POLICY_REFUSED": 2, "4002 RUN_NOT_SIGNED": 1}
    assert all(r["time"].endswith("Z") and "T" in r["time"] for r in ref["recent"])


def test_a_window_of_days(state):
    s = audit_summary(state, since=T0 + DAY, until=T0 + 2 * DAY)
    assert [d["day"] for d in s["by_day"]] == ["2025-12-07"] and s["outgoing"]["messages"] == 2
    assert s["refusals"]["total"] == 0  # written now, after the window


def test_command_table_and_json(state, capsys):
    assert main(["audit", "--state-dir", str(state.root)]) == 0
    out = capsys.readouterr().out
    assert "what left this site, per run" in out and "training.max_rounds_per_day" in out
    assert "4002 RUN_NOT_SIGNED" in out and "releases received: 0" in out
    assert main(["audit", "--state-dir", str(state.root), "--format", "json", "--days", "7"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["refusals"]["total"] == 3 and data["since"].endswith("Z")
    assert data["since"] > time.strftime("%Y-%m-%dT", time.gmtime(time.time() - 8 * DAY))


@pytest.mark.parametrize("argv,words", [([], "--state-dir"), (["--state-dir", "/nonexistent/x"], "no audit folder"),
                                       (["--audit-dir", ".", "--since", "yesterday"], "--since 'yesterday'")])
def test_bad_input_is_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err
