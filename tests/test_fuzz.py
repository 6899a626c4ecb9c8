"""The fuzzing campaign inside the suite (issue 12): every input the fuzzers ever crashed on is a regression
test here, and a short deterministic atheris run (fixed seed, bounded by count and time) finds no new crash.
The longer campaign is documented in tests/fuzz/README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
from contract import check_dicom_bytes, check_image_bytes  # noqa: E402

REGRESSIONS = sorted((FUZZ / "regressions").glob("*"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_regression(path):
    """Each minimised crash input now ends in a listed SkipImage reason (or a valid image)."""
    check = check_image_bytes if path.suffix in (".png", ".jpg") else check_dicom_bytes
    reason = check(path.read_bytes())
    want = path.stem.split("--")[-1] if "--" in path.stem else None
    assert want is None or reason == want, (path.name, reason)


def _run(harness: str, corpus: Path, tmp: Path, runs: int, seconds: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FUZZ / harness), str(corpus), "-seed=1", f"-runs={runs}",
           f"-max_total_time={seconds}", "-max_len=65536", "-rss_limit_mb=2048", "-timeout=20",
           f"-artifact_prefix={tmp}/", "-print_final_stats=1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, cwd=tmp)


def test_short_deterministic_fuzz_run_finds_no_crash(tmp_path):
    pytest.importorskip("atheris")
    from seeds import build_dicom_seeds, build_png_seeds

    assert build_dicom_seeds(tmp_path / "dicom") >= 20
    build_png_seeds(tmp_path / "png")
    for harness, corpus, runs, seconds in (("fuzz_dicom.py", "dicom", 2000, 20), ("fuzz_png.py", "png", 1000, 8)):
        proc = _run(harness, tmp_path / corpus, tmp_path, runs, seconds)
        crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("oom-*"))
        assert proc.returncode == 0 and not crashes, (harness, crashes, proc.stderr[-4000:])
        assert "Done" in proc.stderr or "stat::number_of_executed_units" in proc.stderr, proc.stderr[-2000:]


def test_regressions_through_the_cache_workers(tmp_path):
    """The same inputs through the decode worker processes: each is one skipped file, never a dead load."""
    from fedrad.common.cache import DecodedCache

    dicoms = [p for p in REGRESSIONS if p.suffix == ".dcm"]
    imgs, kept, skipped = DecodedCache(tmp_path / "c", 16, workers=1).load(dicoms, progress=False)
    assert len(kept) + len(skipped) == len(dicoms)
    assert all(reason != "decoder-crashed" for reason in skipped.values())
