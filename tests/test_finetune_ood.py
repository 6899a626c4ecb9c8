"""`fedrad finetune --test-data OTHER`: the probe trains on one site's labelled set and is tested on another's
(REMEDIS's out-of-distribution setting); sets whose targets differ are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from release_fixtures import make_bundle

from fedrad.client.evaluation.data import LabelledSet, load_folder
from fedrad.client.tools.finetune.ood import combine_for_ood
from fedrad.deploy.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("ood")
    bundle, _key, pub = make_bundle(root)
    sites = write_synthetic_sites(root / "sites", n_sites=2, patients_per_site=12, images_per_patient=(1, 3),
                                  size=48, seed=3)
    return bundle, pub, sites


def test_combine_keeps_sides_apart_and_uses_official_splits() -> None:
    rng = np.random.default_rng(0)
    a = LabelledSet(rng.random((6, 8, 8), dtype=np.float32), rng.integers(0, 2, (6, 1)).astype(np.float32),
                    ["label"], np.array([0, 0, 1, 2, 3, 3]), source="a")
    b = LabelledSet(rng.random((5, 8, 8), dtype=np.float32), rng.integers(0, 2, (5, 1)).astype(np.float32),
                    ["label"], np.arange(5), split={"train": np.arange(3), "test": np.array([3, 4])}, source="b")
    data, tr, te, what = combine_for_ood(a, b)
    assert len(tr) == 6 and len(te) == 2 and "out-of-distribution" in what and "official test" in what
    assert np.array_equal(data.images[te], b.images[3:]) and np.array_equal(data.y[tr], a.y)
    assert not set(data.groups[tr]) & set(data.groups[te])  # no patient on both sides
    b.targets = ["other"]
    with pytest.raises(ValueError, match="targets"):
        combine_for_ood(a, b)


def test_finetune_trains_at_one_site_and_tests_at_another(setup, tmp_path, capsys) -> None:
    bundle, pub, sites = setup
    out = tmp_path / "ood"
    code = main(["finetune", str(bundle), "--pubkey", str(pub), "--data", str(sites[0]), "--labels",
                 str(sites[0] / "labels.csv"), "--test-data", str(sites[1]), "--test-labels",
                 str(sites[1] / "labels.csv"), "--target", "finding", "--fractions", "1.0", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["split"].startswith("out-of-distribution") and res["meta"]["test_data"] == str(sites[1])
    n_train = len(load_folder(sites[0], 32, sites[0] / "labels.csv", ["finding"], cache_dir=tmp_path / "c0"))
    n_test = len(load_folder(sites[1], 32, sites[1] / "labels.csv", ["finding"], cache_dir=tmp_path / "c1"))
    for row in res["rows"]:
        assert row["train_images"] == n_train and row["test_images"] == n_test
        assert row["ci_low"] <= row["auc"] <= row["ci_high"]
    assert {r["backbone"] for r in res["rows"]} == {"pretrained", "random-init"}


def test_test_set_with_other_targets_is_one_line_exit_2(setup, tmp_path, capsys) -> None:
    bundle, pub, sites = setup
    rows = (sites[1] / "labels.csv").read_text().splitlines()
    graded = [rows[0]] + [f"{r.split(',')[0]},{'abc'[i % 3]}" for i, r in enumerate(rows[1:])]
    other = tmp_path / "graded.csv"  # 'finding' with three grades: targets finding=a/b/c, not 'finding'
    other.write_text("\n".join(graded) + "\n")
    code = main(["finetune", str(bundle), "--pubkey", str(pub), "--data", str(sites[0]), "--labels",
                 str(sites[0] / "labels.csv"), "--test-data", str(sites[1]), "--test-labels", str(other),
                 "--target", "finding", "--device", "cpu", "--out", str(tmp_path / "x")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "--test-data" in err[0] and "finding=a" in err[0]
