"""`fedrad embed`: embeddings + index without raw patient IDs + a t-SNE plot."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from release_fixtures import make_bundle

from fedrad.deploy.cli import main


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    return write_synthetic_sites(tmp_path_factory.mktemp("s"), n_sites=1, patients_per_site=8,
                                 images_per_patient=(1, 3), size=48, seed=5)[0]


def test_embed_folder(tmp_path, site):
    b, _key, pub = make_bundle(tmp_path)
    out = tmp_path / "emb"
    assert main(["embed", str(b), "--pubkey", str(pub), "--data", str(site), "--color-by", "finding",
                 "--out", str(out)]) == 0
    emb = np.load(out / "embeddings.npy")
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert emb.shape[0] == len(rows) > 5 and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert {"path", "finding", "patient_key"} <= set(rows[0])
    assert not (set(rows[0]) & {"patient_id", "PatientID"})
    raw_ids = {f"SITE-A-{p:04d}" for p in range(8)}
    text = (out / "index.csv").read_text()
    assert not any(r in text for r in raw_ids)
    assert (out / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embed_rejects_bad_bundle_and_bad_column(tmp_path, site, capsys):
    b, _key, pub = make_bundle(tmp_path)
    (b / "manifest.json").write_text((b / "manifest.json").read_text().replace('"rounds": 2', '"rounds": 3'))
    assert main(["embed", str(b), "--pubkey", str(pub), "--data", str(site), "--out", str(tmp_path / "e")]) == 1
    assert "modified after signing" in capsys.readouterr().err
    code = main(["embed", str(b), "--insecure", "--data", str(site), "--color-by", "nope",
                 "--out", str(tmp_path / "e")])
    assert code == 2 and "--color-by" in capsys.readouterr().err
