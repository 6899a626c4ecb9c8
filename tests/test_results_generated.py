"""benchmarks/RESULTS.md is generated from benchmarks/results/*.jsonl and benchmarks/notes/*.md (issue 24).

It must equal make_results.py's output; every row must parse and carry the fields; every benchmark must record
through common_bench.record_row and none may write RESULTS.md itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common_bench  # noqa: E402
import make_results  # noqa: E402

DATE = re.compile(r"^\d{4}-\d\d-\d\d$")


def test_results_md_is_what_the_generator_writes():
    out = subprocess.run([sys.executable, str(BENCH / "make_results.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + "\n(run: python benchmarks/make_results.py)"


def test_every_row_parses_and_has_the_fields():
    files = sorted((BENCH / "results").glob("*.jsonl"))
    assert files
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path.name}:{number}"
            assert [k for k in make_results.REQUIRED if k not in row] == [], where
            assert row["bench"] == path.stem, where
            assert DATE.match(row["date"]), where
            assert row["value"] is None or (isinstance(row["value"], int | float)
                                            and not isinstance(row["value"], bool)), where
            assert row["met"] in (True, False, None), where
            assert row["load"] is None or isinstance(row["load"], int | float), where
            assert isinstance(row["metric"], str) and row["metric"], where
            assert isinstance(row["command"], str) and row["command"], where
    # the generator reads the same files without complaint
    make_results.generate(BENCH / "results", BENCH / "notes")


def test_every_benchmark_records_through_record_row_and_none_writes_results_md():
    benches = sorted(BENCH.glob("bench_*.py"))
    assert benches
    for path in benches:
        text = path.read_text(encoding="utf-8")
        name = path.stem.removeprefix("bench_")
        assert "record_row(" in text, f"{path.name} does not record through common_bench.record_row"
        assert re.search(r"""record_row\(\s*["']""" + name + """["']""", text), \
            f"{path.name} records under another bench name than {name!r}"
        assert not re.search(r"""["']RESULTS\.md["']""", text), f"{path.name} names RESULTS.md as a path"
        assert not re.search(r"\bRESULTS\s*=|\bRESULTS\.(open|write)", text), f"{path.name} writes RESULTS"
    common = (BENCH / "common_bench.py").read_text(encoding="utf-8")
    assert "append_result" not in common and "append_to_section" not in common


def test_a_recorded_row_round_trips_into_its_table(tmp_path):
    results, notes = tmp_path / "results", tmp_path / "notes"
    notes.mkdir()
    (notes / "demo_x.md").write_text("# What it measures\n\nProse about demo_x.\n")
    row = common_bench.record_row("demo_x", "steps/s | fast", 12.5, "steps/s", command="python bench_demo_x.py",
                                  goal=">= 10", met=True, note="quiet box", results_dir=results, model="resnet18")
    common_bench.record_row("demo_x", "old", 1, "s", command="c", results_dir=results, superseded="bug")
    lines = (results / "demo_x.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == row
    assert row["bench"] == "demo_x" and DATE.match(row["date"]) and row["model"] == "resnet18"
    assert isinstance(row["load"], float) and row["machine"]
    text = make_results.generate(results, notes)
    assert "## demo_x" in text and "### What it measures" in text and "Prose about demo_x." in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + 2 rows, one table
    assert "steps/s \\| fast" in table[1] and "12.5 steps/s" in table[1] and "| yes |" in table[1]
    assert "model=resnet18" in table[1] and "quiet box" in table[1]
    assert "superseded (bug)" in table[2]  # superseded rows last
    assert make_results.generate(results, notes) == text  # deterministic
    out = tmp_path / "RESULTS.md"
    args = ["--results-dir", str(results), "--notes-dir", str(notes), "--out", str(out)]
    assert make_results.main(args + ["--check"]) == 1
    assert make_results.main(args) == 0 and out.read_text() == text
    assert make_results.main(args + ["--check"]) == 0


def test_record_row_refuses_what_is_not_a_row(tmp_path):
    with pytest.raises(TypeError):
        common_bench.record_row("x", "m", "12", "s", command="c", results_dir=tmp_path)
    with pytest.raises(TypeError):
        common_bench.record_row("x", "m", 1, "s", command="c", results_dir=tmp_path, date="2020-01-01")
    nan = common_bench.record_row("x", "m", float("nan"), "s", command="c", results_dir=tmp_path)
    assert nan["value"] is None and "nan" in nan["note"]


def test_a_bad_line_is_one_message_naming_file_and_line(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"bench": "x"}\n')
    assert make_results.main(["--results-dir", str(tmp_path), "--notes-dir", str(tmp_path),
                              "--out", str(tmp_path / "R.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "x.jsonl:1" in err and "missing" in err


def test_every_benchmark_module_imports():
    """A benchmark run weeks later must still start: each benchmarks/*.py imports (in one fresh interpreter), so
    a helper moved between them breaks a test, not the next measurement (bench_soak lost `MB` that way)."""
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    code = ("import importlib, sys\nsys.path[:0] = [sys.argv[1], sys.argv[2]]\nbad = []\n"
            "for name in sys.argv[3:]:\n    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        bad.append(f'{name}: {exc!r}')\nprint('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH), str(REPO / "tests"), *names],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
