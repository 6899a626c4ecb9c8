"""Fine-tuning: AUC with a CI, patient-level splits, DP accounting and the outputs, on a tiny model.

Data: a few hundred PneumoniaMNIST images when the shared data is present (FEDRAD_SHARED_DATA or
<repo>/../shared/data), else synthetic DICOM sites; the folder/DICOM path always runs on synthetic sites.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from release_fixtures import make_bundle

from fedrad.client.tools.finetune import (
    auc_score,
    binarise,
    bootstrap_ci,
    patient_split,
    subsample_patients,
)
from fedrad.deploy.cli import main
from fedrad.deploy.demo import demo_finetune

PNG = b"\x89PNG\r\n\x1a\n"


def shared_data() -> Path:
    env = os.environ.get("FEDRAD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    b, _key, pub = make_bundle(tmp_path_factory.mktemp("ftb"))
    return b, pub


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    from fedrad.deploy.synthetic import write_synthetic_sites

    return write_synthetic_sites(tmp_path_factory.mktemp("sites"), n_sites=2, patients_per_site=12,
                                 images_per_patient=(1, 3), size=48, seed=3)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, sites) -> Path:
    """300 train / 200 test PneumoniaMNIST images, or the synthetic sites as an npz if the data is absent."""
    out = tmp_path_factory.mktemp("npz") / "small.npz"
    src = shared_data() / "pneumoniamnist" / "pneumoniamnist_28.npz"
    if src.is_file():
        d = np.load(src)
        np.savez(out, train_images=d["train_images"][:300], train_labels=d["train_labels"][:300],
                 test_images=d["test_images"][:200], test_labels=d["test_labels"][:200])
        return out
    from fedrad.client.tools.finetune import load_folder

    ds = load_folder(sites[0], 28, targets=["finding"], cache_dir=out.parent / "cache")
    imgs = (ds.images * 255).astype(np.uint8)
    half = len(imgs) // 2
    np.savez(out, train_images=imgs[:half], train_labels=ds.y[:half].astype(np.uint8),
             test_images=imgs[half:], test_labels=ds.y[half:].astype(np.uint8))
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0
        assert r["ci_low"] <= r["auc"] <= r["ci_high"]


def test_linear_on_npz_writes_tables_and_plot(bundle, small_npz, tmp_path):
    b, pub = bundle
    out = tmp_path / "out"
    code = main(["finetune", str(b), "--pubkey", str(pub), "--data", str(small_npz), "--mode", "linear",
                 "--fractions", "0.1,1.0", "--seeds", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    _check_rows(rows)
    assert {r["backbone"] for r in rows} == {"pretrained", "random-init"}
    assert {r["fraction"] for r in rows} == {0.1, 1.0}
    assert (out / "auc_vs_fraction.png").read_bytes()[:8] == PNG
    assert "| pretrained | linear | 10% |" in (out / "results.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_mlp_with_dp_reports_epsilon_within_target(bundle, small_npz, tmp_path):
    b, pub = bundle
    out = tmp_path / "dp"
    code = main(["finetune", str(b), "--pubkey", str(pub), "--data", str(small_npz), "--mode", "mlp",
                 "--fractions", "1.0", "--epochs", "3", "--dp-epsilon", "2.0", "--dp-delta", "1e-5",
                 "--device", "cpu", "--out", str(out), "--compare", str(b)])
    assert code == 0
    rows = _rows(out)
    _check_rows(rows)
    assert len(rows) == 3  # pretrained, random-init, compare
    for r in rows:
        assert r["epsilon"] is not None and math.isfinite(r["epsilon"]) and 0 < r["epsilon"] <= 2.0 + 1e-6


def test_full_mode_with_dp_groupnorm(bundle, small_npz, tmp_path):
    b, pub = bundle
    out = tmp_path / "full"
    code = main(["finetune", str(b), "--pubkey", str(pub), "--data", str(small_npz), "--mode", "full",
                 "--fractions", "1.0", "--epochs", "1", "--dp-epsilon", "8", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    _check_rows(rows)
    assert all(0 < r["epsilon"] <= 8 + 1e-6 for r in rows)


def test_full_mode_without_dp(bundle, small_npz, tmp_path):
    b, pub = bundle
    out = tmp_path / "full-nodp"
    assert main(["finetune", str(b), "--insecure", "--data", str(small_npz), "--mode", "full", "--fractions",
                 "0.1", "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    _check_rows(_rows(out))


def test_patient_split_and_subsample_keep_patients_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 5, 40))
    y = (groups % 3 == 0).astype(np.float32)[:, None]
    tr, te = patient_split(groups, y, seed=1)
    assert len(tr) + len(te) == len(groups)
    assert not set(groups[tr]) & set(groups[te])
    assert set(y[te, 0]) == {0.0, 1.0} and set(y[tr, 0]) == {0.0, 1.0}
    sub = subsample_patients(tr, groups, y, 0.2, seed=0)
    kept = set(groups[sub])
    assert all(set(np.flatnonzero(groups == g)) <= set(sub) for g in kept)  # every image of a kept patient
    assert set(y[sub, 0]) == {0.0, 1.0}


def test_binarise_and_multilabel_ci():
    y, names, mask = binarise({"finding": ["1", "0", "", "1"], "view": ["AP", "PA", "AP", "LAT"]})
    assert names == ["finding", "view=AP", "view=LAT", "view=PA"] and mask.tolist() == [True, True, False, True]
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, (60, 2)).astype(np.float32)
    p = yy * 0.6 + rng.random((60, 2)) * 0.5
    auc, lo, hi = bootstrap_ci(yy, [p], np.arange(60) // 2, n_boot=200)
    assert 0.5 < auc <= 1 and lo <= auc <= hi


def test_dicom_folder_with_labels_csv_and_multilabel(bundle, sites, tmp_path):
    b, pub = bundle
    out = tmp_path / "dcm"
    code = main(["finetune", str(b), "--pubkey", str(pub), "--data", str(sites[1]), "--labels",
                 str(sites[1] / "labels.csv"), "--target", "finding,sex", "--fractions", "0.5,1.0",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["split"].startswith("patient-level")
    assert set(res["rows"][0]["per_target"]) == {"finding", "sex=M"}
    _check_rows(res["rows"])


def test_demo_finetune(bundle, sites, tmp_path):
    b, pub = bundle
    table = demo_finetune(b, pub, sites, tmp_path / "demo")
    assert "pretrained" in table and "random-init" in table and "25%" in table
    assert (tmp_path / "demo" / "auc_vs_fraction.png").read_bytes()[:8] == PNG


def test_auc_is_sklearns_with_ties_and_nan_for_one_class():
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 0, 1, 1, 0, 1], dtype=np.float32)
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])  # ties across classes count one half
    # positives 0.35, 0.8, 0.4 vs negatives 0.1, 0.4, 0.4: 1 + 3 + (1 + 2 ties x 0.5) = 6 of 9 pairs
    assert auc_score(y, s) == pytest.approx(6.0 / 9) == roc_auc_score(y, s)
    assert math.isnan(auc_score(np.ones(4), np.arange(4.0)))


def test_finetune_needs_no_scipy():
    """scipy is not a declared dependency: the metrics come from scikit-learn's public API only."""
    import ast

    import fedrad.client.tools.finetune as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.split(".")[0] == "scipy" for m in mods), path


def test_common_split_patients_is_the_one_patient_split():
    from fedrad.common.splits import split_patients

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), rng.integers(1, 4, 30))
    strata = (groups < 6).astype(int)  # 6 positive patients, 24 negative
    chosen, rest = split_patients(groups, 0.5, seed=3, strata=strata)
    assert sorted(np.concatenate([chosen, rest]).tolist()) == list(range(len(groups)))
    assert not set(groups[chosen]) & set(groups[rest])
    assert len(set(groups[chosen]) & set(range(6))) == 3 and len(set(groups[chosen]) - set(range(6))) == 12
    again, _ = split_patients(groups, 0.5, seed=3, strata=strata)
    assert np.array_equal(chosen, again)  # deterministic
    # both_sides: a tiny fraction still takes one patient per stratum and leaves one behind
    chosen, rest = split_patients(np.array([0, 1, 2, 3]), 0.01, seed=0, strata=np.array([1, 1, 0, 0]),
                                  both_sides=True)
    assert len(chosen) == 2 and len(rest) == 2 and set(chosen.tolist()) & {0, 1} and set(chosen.tolist()) & {2, 3}
    with pytest.raises(ValueError):
        split_patients(groups, 1.5)
