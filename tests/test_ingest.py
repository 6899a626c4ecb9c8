"""`fedrad ingest` (issue 26): resumable after SIGKILL, broken files skipped once, a round leaves the rest pending."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from dicom_fixtures import make_corrupt_files, small_dicom

from fedrad.client.site.ingest import ingest_site
from fedrad.client.site.site_data import load_site


def _site(folder, n, rows=24):
    for i in range(n):
        small_dicom(folder / f"s{i // 50}" / f"img{i:04d}.dcm", rows=rows + i % 3, cols=rows, patient_id=f"P{i % 7}")
    return folder


def _committed(store) -> int:
    try:
        db = sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True, timeout=1)
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.Error:
        return 0


def _ingest(data, cache, state, env, **kw):
    cmd = [sys.executable, "-m", "fedrad.deploy.cli", "ingest", str(data), "--cache", str(cache), "--state-dir",
           str(state), "--image-size", "16", "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_ingest_killed_mid_way_resumes_without_decoding_anything_twice(tmp_path):
    n = 240
    data = _site(tmp_path / "data", n, rows=200)
    cache, state, store = tmp_path / "cache", tmp_path / "state", tmp_path / "cache" / "s16"
    env = {**os.environ, "FEDRAD_INGEST_BATCH": "8", "FEDRAD_DECODE_WORKERS": "1", "OMP_NUM_THREADS": "1"}
    proc = _ingest(data, cache, state, env)
    while _committed(store) < 16 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its decode workers, mid-way
    proc.wait()
    stored = _committed(store)
    assert 16 <= stored < n, "killed after it finished: the folder is too small for this machine"
    done = _ingest(data, cache, state, env)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    decoded, before = map(int, re.search(r"(\d+) decoded now, (\d+) already stored", out).groups())
    assert before == stored and decoded == n - stored  # nothing committed is decoded again, nothing lost
    db = sqlite3.connect(store / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    named = {r[0] for r in db.execute("SELECT name FROM chunks")}
    assert {p.name for p in store.glob("chunk-*")} == named  # an orphan chunk of the killed batch is deleted
    site = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    assert len(site) == n and site.pending == 0


def test_broken_files_are_skipped_once_with_their_reason_and_a_round_leaves_new_files_pending(tmp_path):
    data = _site(tmp_path / "data", 30)
    expected = make_corrupt_files(data / "bad")
    cache, state = tmp_path / "cache", tmp_path / "state"
    first = ingest_site(data, 16, cache_dir=cache, state_dir=state, progress=False, workers=0)
    assert first["decoded"] == 30 + len(expected) and first["stored_before"] == 0
    again = ingest_site(data, 16, cache_dir=cache, state_dir=state, progress=False, workers=0, full=True)
    assert again["decoded"] == 0 and again["stored_before"] == 30 + len(expected)  # broken ones not retried
    quick = ingest_site(data, 16, cache_dir=cache, state_dir=state, progress=False, workers=0)
    assert quick["decoded"] == 0 and quick["files"] == 0  # nor even listed by a quick pass
    site = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=0)
    assert len(site) == 30 and site.pending == 0
    assert sum(site.skipped.values()) == len(expected)
    _site(tmp_path / "more", 5)
    for p in (tmp_path / "more").rglob("*.dcm"):
        os.replace(p, data / f"new-{p.name}")
    site = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=2)
    assert len(site) == 30 and site.pending == 5  # a round trains on what is stored, says what waits
    ingest_site(data, 16, cache_dir=cache, state_dir=state, progress=False, workers=0)
    site = load_site(data, 16, cache_dir=cache, state_dir=state, progress=False, max_decode=2)
    assert len(site) == 35 and site.pending == 0


def test_ingest_cli_bad_folder_is_one_line_exit_2(tmp_path, capsys):
    from fedrad.deploy.cli import main

    assert main(["ingest", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder not found" in err


def _small_files(limit: int):
    def cap() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file past `limit` bytes: a full disk
    return cap


@pytest.mark.slow
def test_ingest_on_a_full_disk_fails_with_one_clear_line_and_the_store_stays_consistent(tmp_path):
    n = 40
    data = _site(tmp_path / "data", n)
    cache, state, store = tmp_path / "cache", tmp_path / "state", tmp_path / "cache" / "s64"
    env = {**os.environ, "FEDRAD_INGEST_BATCH": "8", "FEDRAD_DECODE_WORKERS": "0"}
    cmd = [sys.executable, "-m", "fedrad.deploy.cli", "ingest", str(data), "--cache", str(cache), "--state-dir",
           str(state), "--quiet"]
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=_small_files(100_000))  # 8 images of 64 px fit, 16 do not
    assert full.returncode == 2, full.stdout + full.stderr
    assert "disk is full" in full.stderr and "Traceback" not in full.stderr
    stored = _committed(store)
    assert stored < n
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    decoded, before = map(int, re.search(r"(\d+) decoded now, (\d+) already stored", done.stdout).groups())
    assert before == stored and decoded == n - stored
    assert sqlite3.connect(store / "index.sqlite").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
