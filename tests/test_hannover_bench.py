"""bench_hannover's pieces that decide what its numbers mean: the patient split and the goal check."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_hannover as bh  # noqa: E402


def synthetic_rows(n_patients: int = 40) -> list[dict[str, str]]:
    rows = []
    for p in range(n_patients):
        for i in range(1 + p % 5):  # 1-5 images per patient
            rows.append({"image": f"png/{p:03d}_{i}.png", "patient_id": f"pat{p:03d}", "icu": str(p % 3 == 0)})
    return rows


def test_split_keeps_patients_whole_and_disjoint():
    rows = synthetic_rows()
    test, sites = bh.split_patients(rows, seed=3)
    everyone = {r["patient_id"] for r in rows}
    assert len(sites) == bh.N_SITES and all(sites)
    # every patient in exactly one place: test or one hospital (so all of a patient's images go together)
    places = [test, *sites]
    assert set().union(*places) == everyone
    assert sum(len(s) for s in places) == len(everyone)
    assert abs(len(test) - bh.TEST_FRACTION * len(everyone)) <= 2
    # both icu strata in the test set, and hospitals of similar size in images
    icu = {r["patient_id"]: r["icu"] for r in rows}
    assert {icu[p] for p in test} == {"True", "False"}
    n_img = [sum(1 for r in rows if r["patient_id"] in s) for s in sites]
    assert max(n_img) - min(n_img) <= 5
    assert bh.split_patients(rows, seed=3) == (test, sites)  # deterministic


def test_hospital_folders_hold_only_their_patients(tmp_path):
    src = bh.shared_data() / "hannover"
    if not (src / "labels.csv").is_file():
        pytest.skip("shared Hannover data not found (set FEDRAD_SHARED_DATA)")
    rows = bh.read_rows(src)[:30]
    test, sites = bh.split_patients(rows, seed=0)
    folders = bh.write_hospitals(src, rows, sites, tmp_path)
    seen = set()
    for folder, patients in zip(folders, sites, strict=True):
        with open(folder / "manifest.csv", newline="") as f:
            manifest = list(csv.DictReader(f))
        assert list(manifest[0]) == ["image", "patient_id"]  # no label column reaches pretraining
        assert {m["patient_id"] for m in manifest} == patients
        assert all((folder / m["image"]).is_file() for m in manifest)
        seen |= {m["patient_id"] for m in manifest}
    assert not seen & test


def row(target, backbone, mode, frac, auc, lo=None):
    return {"target": target, "backbone": backbone, "mode": mode, "fraction": frac, "auc": auc,
            "ci_low": auc - 0.1 if lo is None else lo, "ci_high": auc + 0.1}


def test_goal_check_counts_targets_with_enough_gain():
    rows = [row("sex", "random-init", "linear", 0.1, 0.50), row("sex", "federated", "linear", 0.1, 0.60),
            row("view", "random-init", "linear", 0.1, 0.90), row("view", "federated", "linear", 0.1, 0.95),
            row("icu", "random-init", "linear", 0.1, 0.70), row("icu", "federated", "linear", 0.1, 0.72),
            row("icu", "federated", "linear", 1.0, 0.99)]  # another fraction: ignored
    g = bh.goal_check(rows)
    assert g["wins"] == ["sex", "view"] and g["label_goal"]
    assert g["full_goal"] is None  # no full fine-tuning rows: not run, not "met"
    g = bh.goal_check(rows[:4] + [row("icu", "federated", "linear", 0.1, 0.60), rows[4]])
    assert g["label_goal"]
    g = bh.goal_check([r for r in rows if r["target"] != "view"])
    assert g["wins"] == ["sex"] and not g["label_goal"]
    assert "MISSED" in bh.goal_lines(g)[0]


def test_goal_check_full_finetune_beyond_ci():
    rows = [row("sex", "random-init", "full", 0.1, 0.70, lo=0.60), row("sex", "federated", "full", 0.1, 0.61),
            row("icu", "random-init", "full", 1.0, 0.80, lo=0.75), row("icu", "federated", "full", 1.0, 0.74)]
    g = bh.goal_check(rows)
    assert g["full_checked"] == 2 and g["full_goal"] is False and g["full_worse"] == ["icu 100%"]
    rows[3] = row("icu", "federated", "full", 1.0, 0.76)
    assert bh.goal_check(rows)["full_goal"] is True
