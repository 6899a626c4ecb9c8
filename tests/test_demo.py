"""`fedrad demo` end to end, as a user runs it after `pip install fedrad-*.whl` into a fresh venv.

One run checks both Done-when lines of issue 15 (CI pays for one demo, not two): the wheel alone runs the
whole demo (no checkout on the path), and the demo makes its point: the held-out contrastive loss falls
across rounds and the pretrained backbone is at least as good as random init at the fewest labels.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_install import _installed_venv

HELD_OUT_DROP = 0.05  # the last round's held-out loss is at least 5 % below the first round's


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


@pytest.mark.slow
def test_demo_from_wheel_learns_and_beats_random_init_with_few_labels(tmp_path):
    venv = _installed_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(venv / "bin/python"), "-c", "import fedrad; print(fedrad.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.strip()
    assert where.startswith(str(venv)), "the demo must run the wheel's fedrad, not the checkout's"

    workdir = tmp_path / "demo"
    proc = subprocess.run([str(venv / "bin/fedrad"), "demo", "--workdir", str(workdir)], capture_output=True,
                          text=True, timeout=1500, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = workdir / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = len(rows)
    assert rounds == 4 and (run / f"checkpoints/round-{rounds:04d}.safetensors").exists()
    assert (run / "plots" / "loss.png").exists() and (run / "global.safetensors").exists()
    assert "federated pretraining summary" in out

    held = [r["eval_loss"] for r in rows]
    assert held[-1] < held[0] * (1 - HELD_OUT_DROP), f"held-out loss did not fall: {held}"

    results = json.loads((workdir / "finetune" / "results.json").read_text())["rows"]
    lowest = min(r["fraction"] for r in results)
    at = {r["backbone"]: r for r in results if r["fraction"] == lowest}
    pre, rnd = at["pretrained"], at["random-init"]
    wins = sum(r["auc"] >= o["auc"] for r in results for o in results
               if r["backbone"] == "pretrained" and o["backbone"] == "random-init" and r["fraction"] == o["fraction"])
    # benchmarks/RESULTS.md "demo_recipe": with 80 % crops, 4 x 100 steps and 100 patients per site the real demo
    # led random init at 25 % labels by +0.16 AUC with disjoint CIs; the smaller recipe before it swung +-0.08.
    assert pre["auc"] >= rnd["auc"], f"random init ahead at {lowest:.0%} labels: {pre} {rnd}"
    assert wins * 2 > len(results) // 2, f"pretrained behind at most fractions: {results}"
    assert not _flower_processes_mentioning(str(workdir)), "the demo left Flower processes behind"


def test_verdicts_explain_each_fraction_where_random_init_is_ahead():
    from fedrad.deploy.demo import verdicts

    def row(backbone, frac, auc, lo, hi):
        return {"backbone": backbone, "fraction": frac, "auc": auc, "ci_low": lo, "ci_high": hi,
                "train_patients": int(84 * frac)}

    rows = [row("pretrained", 0.25, 0.76, 0.6, 0.9), row("random-init", 0.25, 0.68, 0.5, 0.8),
            row("pretrained", 1.0, 0.70, 0.6, 0.8), row("random-init", 1.0, 0.75, 0.65, 0.85)]
    (line,) = verdicts(rows)
    assert line.startswith("at 100% labels (84 patients) random-init is ahead (0.750 vs 0.700)")
    assert "CIs overlap" in line and "catches up" in line
    apart = [row("pretrained", 0.25, 0.55, 0.5, 0.6), row("random-init", 0.25, 0.8, 0.7, 0.9)]
    (line,) = verdicts(apart)
    assert "do not overlap" in line and "catches up" not in line
    assert verdicts(rows[:2]) == []
