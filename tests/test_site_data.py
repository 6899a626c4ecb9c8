"""load_site on DICOM folders (synthetic + real + corrupt), PNG folders with a manifest, labels CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from dicom_fixtures import make_corrupt_files, shared_data, small_dicom

from fedrad.client.site.site_data import default_cache_dir, detect_layout, load_site
from fedrad.common.header_signals import SALT_FILE
from fedrad.deploy.synthetic import write_synthetic_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return write_synthetic_sites(tmp_path_factory.mktemp("syn"), patients_per_site=5, size=48, seed=1)


def test_dicom_site_labels_keys_and_csv(sites, tmp_path):
    site = sites[1]  # flat extension-less names, MONOCHROME1 with rescale + window
    data = load_site(site, 32, cache_dir=tmp_path / "cache", progress=False)
    n_files = sum(1 for p in site.rglob("*") if p.is_file() and p.name != "labels.csv")
    assert len(data) == n_files and data.images.shape == (n_files, 32, 32) and data.image_size == 32
    assert set(data.labels) >= {"modality", "body_part", "view", "sex", "age", "finding"}
    assert set(data.labels["finding"]) <= {"0", "1"} and set(data.labels["modality"]) == {"DX"}
    assert len(set(data.patient_keys)) == 5
    # one string object per distinct value (memory between rounds at 10^6 images, issue 26)
    assert len({id(v) for v in data.labels["modality"]}) == 1
    assert len({id(k) for k in data.patient_keys}) == 5
    assert not any("SITE-B" in k for k in data.patient_keys)  # salted HMACs, not raw PatientIDs
    groups = data.group_ids()
    assert groups.dtype == np.int64 and len(set(groups.tolist())) == 5
    ids = data.label_ids(["view", "sex"])
    combos = [f"{v}|{s}" for v, s in zip(data.labels["view"], data.labels["sex"], strict=True)]
    for i in range(len(data)):
        for j in range(len(data)):
            assert (ids[i] == ids[j]) == (combos[i] == combos[j])
    x = data.as_float(np.arange(3))
    assert tuple(x.shape) == (3, 1, 32, 32) and str(x.dtype) == "torch.float32"
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert (tmp_path / "cache" / "salt.bin").is_file()
    with pytest.raises(KeyError):
        data.label_ids(["nope"])


def test_dicom_site_with_corrupt_files_and_hidden_dirs(tmp_path):
    root = tmp_path / "site"
    for i in range(3):
        small_dicom(root / "a" / f"x{i}", patient_id=f"P{i}")  # no extension
    make_corrupt_files(root / "bad")
    small_dicom(root / ".hidden" / "skip.dcm")
    (root / "README.txt").write_text("not an image")
    data = load_site(root, 16, cache_dir=tmp_path / "c", progress=False)
    assert len(data) == 3
    assert data.skipped == {"truncated": 1, "empty-file": 1, "not-dicom": 1, "no-pixel-data": 1,
                            "bad-dimensions": 1}
    assert all(".hidden" not in p for p in data.paths)


def test_external_labels_csv_by_sop_uid(tmp_path):
    import pydicom

    root = tmp_path / "site"
    paths = [small_dicom(root / f"{i}.dcm", patient_id=f"P{i}") for i in range(3)]
    sop = pydicom.dcmread(paths[1], stop_before_pixels=True).SOPInstanceUID
    lab = tmp_path / "labels.csv"
    lab.write_text(f"sop_uid,effusion\n{sop},1\n")
    data = load_site(root, 16, cache_dir=tmp_path / "c", progress=False, labels_csv=lab)
    got = dict(zip([p.rsplit("/", 1)[-1] for p in data.paths], data.labels["effusion"], strict=True))
    assert got == {"0.dcm": "", "1.dcm": "1", "2.dcm": ""}


def test_png_folder_with_manifest(tmp_path):
    from PIL import Image

    root = tmp_path / "png"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "patient_id": f"p{i // 2}", "view": "pa", "icu": str(i % 2)})
    rows.append({"image": "img/missing.png", "patient_id": "p9", "view": "ap", "icu": "0"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert detect_layout(root)[0] == "images"
    data = load_site(root, 24, cache_dir=tmp_path / "c", progress=False)
    assert len(data) == 6 and data.skipped == {"unreadable": 1}
    assert data.labels["view"] == ["PA"] * 6 and data.labels["icu"] == ["0", "1"] * 3
    assert data.labels["sex"] == ["unknown"] * 6
    assert len(set(data.group_ids().tolist())) == 3


def test_hannover_png_folder(tmp_path):
    root = shared_data() / "hannover"
    data = load_site(root, 16, cache_dir=tmp_path / "c", progress=False)
    assert len(data) == 243 and len(set(data.patient_keys)) == 71
    assert {"icu", "death", "view", "sex"} <= set(data.labels)


def test_real_dicom_folder_readonly_cache_fallback(tmp_path, monkeypatch):
    root = shared_data() / "dicom"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cdir = default_cache_dir(root)
    if cdir == root / ".fedrad-cache":
        pytest.skip("shared data folder is writable here; fallback not exercised")
    assert str(cdir).startswith(str(tmp_path / "xdg"))
    data = load_site(root, 16, progress=False)
    assert len(data) == 12 and sum(data.skipped.values()) == 2
    assert (cdir / "salt.bin").is_file()


def test_state_dir_salt_adopts_cache_salt_and_survives_cache_clear(tmp_path):
    import shutil

    from fedrad.client.site.site_data import site_salt

    root = tmp_path / "site"
    for i in range(3):
        small_dicom(root / f"im{i}.dcm", patient_id=f"P{i}")
    (root / "vol.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    cache, state = tmp_path / "cache", tmp_path / "state"
    before = load_site(root, 16, cache_dir=cache, progress=False)  # today's layout: salt in the cache
    assert before.skipped["unsupported-format"] == 1  # the NIfTI file is counted, not silently dropped
    after = load_site(root, 16, cache_dir=cache, progress=False, state_dir=state)
    assert (state / SALT_FILE).read_bytes() == (cache / "salt.bin").read_bytes()
    assert after.patient_keys == before.patient_keys  # adopted: keys stable
    assert oct((state / SALT_FILE).stat().st_mode & 0o777) == "0o600"
    shutil.rmtree(cache)
    again = load_site(root, 16, cache_dir=cache, progress=False, state_dir=state)
    assert again.patient_keys == before.patient_keys  # clearing the cache does not reset the salt
    assert site_salt(cache, state) == (state / SALT_FILE).read_bytes()
