"""Synthetic cross-sectional volumes end to end (issue 27): written as DICOM, loaded, ordered, trained on.

The synthetic hospital's CT series (file names in reverse slice order), enhanced MR and ultrasound cine go
through the real loader and cache, then a few SimCLR steps run on the CT, MR and US images together.
"""

from __future__ import annotations

import numpy as np

from fedrad.client.site.site_data import load_site
from fedrad.common.intensity import CT_HU_RANGE
from fedrad.deploy.synthetic import write_volumes


def test_synthetic_volumes_load_in_order_and_train(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_volumes(site, "site-a", seed=0)
    data = load_site(site, 32, cache_dir=tmp_path / "cache", progress=False)
    mods = np.asarray(data.labels["modality"])
    assert len(data) == 26 and (mods == "CT").sum() == 12 and (mods == "MR").sum() == 8 and (mods == "US").sum() == 6
    assert set(np.asarray(data.labels["plane"])[mods == "MR"]) == {"CORONAL"}
    ct = np.flatnonzero(mods == "CT")
    assert len(set(data.series_ids[ct])) == 1
    z = data.slice_pos[ct]
    order = np.argsort(z)
    assert np.allclose(np.diff(z[order]), 2.5)  # spacing from the geometry, whatever the file names say
    hu = data.images[ct].astype(np.float32) / 65535 * (CT_HU_RANGE[1] - CT_HU_RANGE[0]) + CT_HU_RANGE[0]
    assert hu[:, 14:18, 8:12].mean() < -600 and abs(hu[:, 6:10, 15:17].mean() - 40) < 150  # lung, soft tissue
    assert data.ct_mask[ct].all() and not data.ct_mask[mods != "CT"].any()
    assert data.affine is not None and np.isfinite(data.affine).all()

    from fedrad.client.training.trainer import TrainConfig, train_local
    from fedrad.common.models import build_model

    model = build_model("test_resnet", "simclr", 32, proj_dim=32)
    cfg = TrainConfig(objective="simclr", steps=4, batch_size=8, lr=1e-3, seed=0, device="cpu")
    result = train_local(model, data, cfg, progress=False)
    assert result.steps == 4 and np.isfinite(result.losses).all()


def test_nearby_slice_positives_pair_slices_of_one_block(tmp_path):
    import torch

    from fedrad.client.training.trainer import TrainConfig, _PairSampler, train_local
    from fedrad.common.models import build_model
    from fedrad.common.series import neighbour_groups

    site = tmp_path / "site"
    site.mkdir()
    write_volumes(site, "site-b", seed=1)
    data = load_site(site, 32, cache_dir=tmp_path / "cache", progress=False)
    groups = neighbour_groups(data.series_ids, data.slice_pos)
    sampler = _PairSampler(data, np.arange(len(data)), 8, torch.Generator().manual_seed(0), groups)
    for _ in range(5):
        anchors, partners, _ = sampler.next()
        assert (groups[anchors] == groups[partners]).all()
        ordered = np.isfinite(data.slice_pos[anchors])
        assert (np.abs(data.slice_pos[anchors] - data.slice_pos[partners])[ordered] < 10).all()
        assert (partners[~ordered] == anchors[~ordered]).all()  # US frames (no geometry): augment pairs
        assert ((partners != anchors) & ordered).any() or not ordered.any()
    model = build_model("test_resnet", "slices", 32, proj_dim=32)
    cfg = TrainConfig(objective="slices", steps=3, batch_size=8, lr=1e-3, seed=0, device="cpu")
    assert np.isfinite(train_local(model, data, cfg, progress=False).losses).all()


def test_burned_in_cine_is_skipped_by_policy_unless_allowed(tmp_path):
    import pydicom

    from fedrad.common.data_rules import DataRules

    site = tmp_path / "site"
    site.mkdir()
    write_volumes(site, "site-c", seed=2, ct_slices=2, mr_frames=2, us_frames=3)
    ds = pydicom.dcmread(site / "xsec/us_cine.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(site / "xsec/us_cine.dcm")
    data = load_site(site, 32, cache_dir=tmp_path / "cache", progress=False)
    assert "US" not in data.labels["modality"] and data.skipped["burned-in-annotation"] == 1
    allowed = load_site(site, 32, cache_dir=tmp_path / "cache", progress=False, rules=DataRules(burned_in_ok=True))
    assert list(allowed.labels["modality"]).count("US") == 3 and not allowed.skipped
