"""`fedrad demo` end to end, as a user runs it (smaller model and one round to stay fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _flower_processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and ("flower-" in cmd or "flwr" in cmd):
            found.append(cmd)
    return found


def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fedrad.deploy.cli", "demo", "--workdir", str(workdir), "--rounds", "2",
           "-c", "model=test_resnet", "-c", "image-size=32", "-c", "local-steps=3", "-c", "batch-size=16",
           "-c", "proj-dim=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = workdir / "run"
    assert (run / "checkpoints" / "round-0001.safetensors").exists()
    assert (run / "checkpoints" / "round-0002.safetensors").exists()
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    assert (run / "plots" / "loss.png").exists()
    assert (run / "global.safetensors").exists()
    assert "federated pretraining summary" in out
    assert not _flower_processes_mentioning(str(workdir)), "the demo left Flower processes behind"
