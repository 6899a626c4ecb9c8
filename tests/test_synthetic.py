"""Synthetic hospitals: real DICOM files, site differences, shared anatomy per patient, speed."""

from __future__ import annotations

import csv
import time
from collections import Counter

import numpy as np
import pydicom

from fedrad.client.site.site_data import load_site
from fedrad.common.dicom_io import read_header
from fedrad.deploy.synthetic import write_synthetic_sites


def test_three_sites_fast_valid_and_different(tmp_path):
    t = time.perf_counter()
    sites = write_synthetic_sites(tmp_path, patients_per_site=15, size=96, seed=0)
    assert time.perf_counter() - t < 10
    assert [s.name for s in sites] == ["site-a", "site-b", "site-c"]
    syntaxes, photometric = {}, {}
    for site in sites:
        files = [p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv"]
        assert 15 <= len(files) <= 60
        hs = [read_header(p) for p in files]
        syntaxes[site.name] = Counter(h.transfer_syntax_name for h in hs)
        photometric[site.name] = {h.photometric for h in hs}
        assert {h.body_part for h in hs} == {"CHEST"} and {h.sex for h in hs} <= {"M", "F"}
        assert all(h.age_years is not None for h in hs) and len({h.patient_id for h in hs}) == 15
        ds = pydicom.dcmread(files[0])
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        with open(site / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(files) and {r["finding"] for r in rows} <= {"0", "1"}
        assert all((site / r["file"]).is_file() for r in rows)
    assert photometric == {"site-a": {"MONOCHROME2"}, "site-b": {"MONOCHROME1"}, "site-c": {"MONOCHROME2"}}
    assert set(syntaxes["site-c"]) == {"RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)"}
    assert pydicom.dcmread(next(sites[1].glob("IM*"))).RescaleSlope == 0.5


def test_decoded_sites_look_alike_and_patients_share_anatomy(tmp_path):
    sites = write_synthetic_sites(tmp_path / "s", patients_per_site=8, images_per_patient=(3, 3), size=64, seed=3)
    means = []
    for site in sites:
        data = load_site(site, 32, cache_dir=tmp_path / f"c-{site.name}", progress=False)
        assert len(data) == 24 and sum(data.skipped.values()) == 0
        x = data.images.astype(np.float32) / 65535
        means.append(float(x.mean()))
        # MONOCHROME1 / windowing handled: lungs dark, centre bright, in every site's decoded images
        assert x[:, 12:20, 8:12].mean() < x[:, 12:20, 15:17].mean()
        g = data.group_ids()
        flat = x.reshape(len(x), -1)
        d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
        same = (g[:, None] == g[None]) & ~np.eye(len(g), dtype=bool)
        views = np.asarray(data.labels["view"])
        same_view = views[:, None] == views[None]
        assert d[same & same_view].mean() < d[~same & same_view].mean()  # one patient = one anatomy
    assert max(means) - min(means) < 0.25


def test_deterministic(tmp_path):
    a = write_synthetic_sites(tmp_path / "a", n_sites=1, patients_per_site=2, size=32, seed=5)[0]
    b = write_synthetic_sites(tmp_path / "b", n_sites=1, patients_per_site=2, size=32, seed=5)[0]
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def test_finding_is_a_visible_opacity_that_persists_across_a_patients_films():
    """What the demo's pretraining can learn: a positive patient's opacities are the same on every film, and
    visible over exposure, pose and noise (the film with them differs from the same film without them)."""
    from fedrad.deploy.synthetic import _anatomy, _opacities, _render

    rng = np.random.default_rng(7)
    anat, opac = _anatomy(rng), _opacities(rng, positive=True)
    assert opac and _opacities(rng, positive=False) == []
    for film in range(3):  # each film: its own pose, exposure and noise (same draws with and without)
        with_finding = _render(64, 64, anat, "PA", opac, np.random.default_rng([film, 1]), 1.0, 0.02)
        without = _render(64, 64, anat, "PA", [], np.random.default_rng([film, 1]), 1.0, 0.02)
        diff = with_finding - without
        assert diff.max() > 0.1  # a visible bright patch
        ys, xs = np.nonzero(diff > 0.5 * diff.max())
        assert 8 < ys.mean() < 56 and 8 < xs.mean() < 56  # inside the chest, not at the film's edge
