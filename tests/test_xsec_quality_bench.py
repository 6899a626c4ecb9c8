"""The cross-sectional quality benchmark's smoke run: the real archive writer, loader, pretraining and probes."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_xsec_quality as bq  # noqa: E402


def test_quick_run_has_every_arm_and_label_with_finite_auc(tmp_path, capsys):
    code = bq.main(["--quick", "--patients", "8", "--slices", "4", "--steps", "2", "--image-size", "16",
                    "--rows", "16", "--threads", "1", "--workdir", str(tmp_path), "--no-record"])
    assert code == 0
    out = capsys.readouterr().out
    assert "archive: 64 slices, 8 patients, 16 series" in out  # labels, patients and series from the headers
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| label")]
    cells = {(r.split("|")[1].strip(), r.split("|")[2].strip()): r.split("|")[3:-1] for r in rows}
    assert set(cells) == {(lab, arm) for lab in bq.LABELS for arm in ("random-init", "simclr", "slices")}
    for values in cells.values():
        assert len(values) == 2
        for v in values:
            auc = float(re.match(r"\s*([0-9.na]+) ±", v).group(1))
            assert math.isfinite(auc) and 0.0 <= auc <= 1.0


def test_bad_fractions_exit_2(capsys):
    assert bq.main(["--quick", "--fractions", "0,x", "--no-record"]) == 2
    assert "--fractions" in capsys.readouterr().err
