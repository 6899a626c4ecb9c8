"""Long runs stay bounded: checkpoints keep the newest K (issue 26), and the coordinator parses only the
metrics lines appended since its last read, not the whole file every round."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

from fedrad.common.run_config import RunConfig
from fedrad.server import run_log
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.run_log import append_metrics, follow_metrics, read_metrics, truncate_metrics


def test_checkpoints_keep_the_newest_k_and_resume_reads_the_latest(tmp_path) -> None:
    assert RunConfig().keep_checkpoints == 5 and RunConfig.from_flower({"keep-checkpoints": 2}).keep_checkpoints == 2
    for rnd in range(1, 8):
        arrays = ArrayRecord({"w": Array(np.full(3, rnd, dtype=np.float32))})
        save_checkpoint(tmp_path, rnd, arrays, None, {"array_order": ["w"]}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round-0005.safetensors", "round-0006.safetensors", "round-0007.safetensors"]
    latest = load_checkpoint(latest_checkpoint(tmp_path))
    assert latest.server_round == 7 and latest.arrays["w"].numpy().tolist() == [7.0, 7.0, 7.0]
    save_checkpoint(tmp_path, 8, arrays, None, {"array_order": ["w"]}, keep=0)  # 0: keep all
    assert len(list((tmp_path / "checkpoints").iterdir())) == 4


def test_followed_metrics_parse_only_new_lines(tmp_path, monkeypatch) -> None:
    parsed: list[str] = []
    real = json.loads
    monkeypatch.setattr(run_log.json, "loads", lambda s: parsed.append(s) or real(s))
    follow_metrics(tmp_path)
    for rnd in range(1, 4):
        append_metrics(tmp_path, {"round": rnd})
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3] and len(parsed) == 3
    append_metrics(tmp_path, {"round": 4})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"round": 5')  # a line still being written
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4] and len(parsed) == 4
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write("}\n")
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5] and len(parsed) == 5
    truncate_metrics(tmp_path, 2)  # resume: the file is replaced, read again from the start
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").unlink()
    assert read_metrics(tmp_path) == []
    append_metrics(tmp_path, {"round": 1})
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]
