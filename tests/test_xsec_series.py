"""Series grouping, slice order, sampling caps and the site policy's data rules (issue 27).

The ordering is checked on the real 10-slice EGSnrc CT series (files named by their true z) and on small
synthetic volumes (shuffled, oblique, inconsistent); the scan on the whole shared dicom_xsec folder.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import shared_data

from fedrad.client.site.policy import PolicyError, default_policy, parse_policy
from fedrad.client.site.scan import scan_folder
from fedrad.common.data_rules import DataRules
from fedrad.common.dicom_io import read_header
from fedrad.common.series import group_series, round_pool, series_arrays, series_quota, thin_by_spacing


def _xsec() -> Path:
    root = shared_data() / "dicom_xsec"
    if not (root / "INDEX.csv").is_file():
        pytest.skip("shared dicom_xsec not found")
    return root


def test_real_ct_series_is_ordered_along_the_normal_with_its_spacing():
    files = sorted((_xsec() / "ct_series_egsnrc_phantom").glob("*.dcm"))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    metas = [read_header(p).as_dict() for p in shuffled]
    (s,) = group_series(metas)
    assert s.ordered_by == "position" and s.spacing == pytest.approx(5.0)
    assert [shuffled[i].name for i in s.members] == [p.name for p in files]  # file names sort by true z
    assert s.positions == pytest.approx([-4.5 + 5 * k for k in range(10)])


def _slice(series: str, pos, orient=(1, 0, 0, 0, 1, 0), number=None, sop=None) -> dict:
    return {"series_uid": series, "position": None if pos is None else list(pos),
            "orientation": None if orient is None else list(orient), "instance_number": number, "sop_uid": sop}


def test_oblique_series_orders_by_projection_not_by_z():
    # a sagittal-ish oblique stack: the normal is mostly x, so z alone would give the wrong order
    c, s_ = np.cos(0.3), np.sin(0.3)
    orient = (0, c, s_, 0, -s_, c)  # rows along y/z, columns along y/z: normal = x
    xs = [3.0, -6.0, 0.0, 9.0, -3.0, 6.0]
    metas = [_slice("S", (x, 100 - 7 * i, 5 * i), orient) for i, x in enumerate(xs)]
    (s,) = group_series(metas)
    assert s.ordered_by == "position" and s.spacing == pytest.approx(3.0)
    assert [xs[i] for i in s.members] == sorted(xs)


def test_inconsistent_geometry_gives_independent_slices_with_a_reason():
    tilted = [_slice("A", (0, 0, z), (1, 0, 0, 0, 1, 0)) for z in (0, 1)] + [_slice("A", (0, 0, 2), (1, 0, 0, 0, 0, 1))]
    (a,) = group_series(tilted)
    assert a.independent and "orientation" in a.reason
    twice = [_slice("B", (0, 0, 0)), _slice("B", (0, 0, 0))]
    (b,) = group_series(twice)
    assert b.independent and "one position" in b.reason
    copies = [_slice("C", (0, 0, 0), sop="1.2"), _slice("C", (0, 0, 0), sop="1.2"), _slice("C", (0, 0, 3), sop="1.3")]
    (c,) = group_series(copies)  # one instance stored twice is one slice, not a geometry conflict
    assert not c.independent and c.spacing == pytest.approx(3.0)
    numbered = [_slice("D", None, None, n) for n in (3, 1, 2)]
    (d,) = group_series(numbered)
    assert d.ordered_by == "instance-number" and d.members == [1, 2, 0]
    (e,) = group_series([_slice("E", None, None, None), _slice("E", None, None, None)])
    assert e.independent and "InstanceNumber" in e.reason


def test_min_spacing_thins_each_ordered_series():
    metas = [_slice("S", (0, 0, 0.5 * k)) for k in range(20)] + [_slice("", None, None)]
    sid, pos, _ = series_arrays(metas)
    kept = thin_by_spacing(np.arange(21), sid, pos, 2.0)
    zs = sorted(pos[k] for k in kept if np.isfinite(pos[k]))
    assert np.diff(zs).min() >= 2.0 and len(zs) == 5 and 20 in kept  # 0, 2, 4, 6, 8 mm; the lone image stays


def test_a_2000_slice_ct_cannot_dominate_a_round():
    sizes = np.array([2000] + [1] * 300)  # one CT series and 300 radiographs
    sid = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(0)
    pool = round_pool(np.arange(len(sid)), sid, 0.1, rng)
    ct = int((sid[pool] == 0).sum())
    assert ct / len(pool) <= 0.1 + 1e-9 and ct >= 30
    again = round_pool(np.arange(len(sid)), sid, 0.1, rng)
    assert set(pool[sid[pool] == 0]) != set(again[sid[again] == 0])  # each round sees other slices
    assert series_quota(np.array([2000, 2000, 2000]), 0.1) == 2000  # only series: equal shares, nothing lost


def test_trainer_sampler_applies_the_series_cap():
    import torch

    from fedrad.client.training.trainer import _PairSampler

    class Data:
        series_ids = np.repeat([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [200] + [4] * 10)
        slice_pos = np.arange(240, dtype=float)
        rules = DataRules(max_series_share=0.2)

    sampler = _PairSampler(Data(), np.arange(240), 8, torch.Generator().manual_seed(0), False)
    drawn = np.concatenate([sampler.next()[0] for _ in range(40)])
    assert (Data.series_ids[drawn] == 0).mean() <= 0.2 + 0.02


def test_shared_folder_scan_uses_every_file_but_policy_exclusions():
    report = scan_folder(_xsec(), progress=False)
    reasons = {s["reason"] for s in report["skipped"]}
    assert reasons == {"modality-excluded"} and report["usable"] == 45  # 6 NM/PT files out by the default policy
    vol = report["volumes"]["by_modality"]
    assert vol["CT"]["slices"] == 17 and vol["CT"]["frames"] == 2
    assert vol["MR"]["frames"] == 50 and vol["US"]["frames"] == 32
    assert 5.0 in report["volumes"]["slice_spacing_mm"]
    allow = scan_folder(_xsec(), progress=False, rules=DataRules(modalities=()))
    assert allow["usable"] == 51 and not allow["skipped"]
    assert "series_uid" not in str(report["files"]) and "1.2.840" not in str(report["volumes"])


def test_burned_in_annotation_is_skipped_unless_allowed():
    meta = {"modality": "US", "burned_in": "YES"}
    assert DataRules().refuse(meta)[0] == "burned-in-annotation"
    assert DataRules(burned_in_ok=True).refuse(meta) is None
    assert DataRules().refuse({"modality": "NM"})[0] == "modality-excluded"
    assert DataRules(modalities=("NM",)).refuse({"modality": "NM"}) is None


def test_policy_data_rules_keys():
    assert default_policy().data_rules == DataRules()  # one place per default: the policy text and DataRules agree
    p = parse_policy('[data]\nmodalities = ["CT", "nm"]\nallow_burned_in = true\nmax_series_share = 0.25\n'
                     'min_slice_spacing_mm = 3\n')
    assert p.data_rules == DataRules(("CT", "NM"), True, 0.25, 3.0)
    with pytest.raises(PolicyError, match="max_series_share"):
        parse_policy("[data]\nmax_series_share = 2\n")


def test_ct_is_stored_in_hounsfield_units_and_windowed_per_batch():
    import torch

    from fedrad.common.dicom_io import decode_item
    from fedrad.common.intensity import CT_HU_RANGE, PRESET_NAMES, apply_intensity, preset_mask

    root = _xsec()
    img, h = decode_item(root / "pydicom_CT_small_ct_signed16_hu_explicitLE.dcm", 128)
    assert h.intensity == "hu"
    hu = img * (CT_HU_RANGE[1] - CT_HU_RANGE[0]) + CT_HU_RANGE[0]
    assert -1100 < np.percentile(hu, 1) < -800 and 900 < hu.max() < 3100  # air and bone where HU put them
    x = torch.from_numpy(np.stack([img, img]))[:, None]
    brain = 1 << PRESET_NAMES.index("brain")
    out = apply_intensity(x, None, np.array([brain, 0]), torch.Generator().manual_seed(0))
    expect = np.clip((hu - (40 - 40)) / 80, 0, 1)
    np.testing.assert_allclose(out[0, 0].numpy(), expect, atol=1e-4)
    assert torch.equal(out[1], x[1])  # not CT: untouched
    assert preset_mask("CHEST") != preset_mask("") and preset_mask("HEAD") & brain


def test_mr_slices_share_their_series_scale():
    from fedrad.common.intensity import series_affines

    lo, hi = np.array([0.0, 0.0, 10.0]), np.array([100.0, 50.0, 110.0])
    aff = series_affines(lo, hi, np.array([0, 0, 1]))
    # series 0: median range 0..75; a slice scaled to 0..50 is shrunk to 2/3 of it
    np.testing.assert_allclose(aff, [[100 / 75, 0], [50 / 75, 0], [1, 0]], rtol=1e-6)


def test_header_labels_plane_and_contrast():
    from fedrad.common.header_signals import UNKNOWN, contrast_label, plane_label

    assert plane_label([1, 0, 0, 0, 1, 0]) == "AXIAL"
    assert plane_label([1, 0, 0, 0, 0, -1]) == "CORONAL"
    assert plane_label([0, 1, 0, 0, 0, -1]) == "SAGITTAL"
    assert plane_label([1, 0, 0, 0, 0.7071, 0.7071]) == "OBLIQUE"
    assert plane_label(None) == plane_label([1, 2]) == UNKNOWN
    assert contrast_label("OMNIPAQUE 350", "CT") == "CONTRAST"
    assert contrast_label("", "CT") == "NONE" and contrast_label("", "CR") == UNKNOWN
    labels = scan_folder(_xsec(), progress=False)["volumes"]
    assert labels["plane"].get("AXIAL", 0) >= 10  # the EGSnrc series and the other axial CT/MR
    assert set(labels["contrast"]) <= {"CONTRAST", "NONE", UNKNOWN}


def test_scan_without_decoding_counts_frames_from_the_header():
    report = scan_folder(_xsec(), decode=False, progress=False)
    vol = report["volumes"]["by_modality"]
    assert vol["MR"]["frames"] == 50 and vol["US"]["frames"] == 32 and vol["CT"]["frames"] == 2
