"""CT/MR pulled from a real PACS (Orthanc) decode exactly like the same files read from a folder (issue 27).

DICOMweb and DIMSE pulls of `--query Modality=CT,MR` over the shared cross-sectional files (a 10-slice CT
series, enhanced multi-frame MR objects): the same frames, pixel-equal, the same series grouping.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dicom_fixtures import shared_data  # noqa: E402
from orthanc_server import find_orthanc, start_orthanc  # noqa: E402

from fedrad.client.site.site_data import load_site  # noqa: E402
from fedrad.common.sources.pacs import PacsOptions, PacsQuery  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xsec_pacs(tmp_path_factory):
    exe, why = find_orthanc()
    if exe is None:
        pytest.skip(why)
    root = shared_data() / "dicom_xsec"
    if not root.is_dir():
        pytest.skip("shared dicom_xsec not found")
    files = [*sorted(root.glob("ct_series_egsnrc_phantom/*.dcm")), *sorted(root.glob("pydicom_emri_small_*LE.dcm")),
             *sorted(root.glob("nema_eCT_*.dcm")), root / "wg04_US1_UNCR_us_rgb_explicitLE.dcm"]
    tmp = tmp_path_factory.mktemp("xsec-pacs")
    server = start_orthanc(tmp / "orthanc")
    try:
        kept = tmp / "kept"
        kept.mkdir()
        for f in files:
            if server.upload(f) == "Success":
                shutil.copy(f, kept / f.name)
        yield server, kept
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_ct_mr_pull_decodes_like_the_folder(xsec_pacs, kind, tmp_path):
    server, kept = xsec_pacs
    folder = load_site(kept, 32, cache_dir=tmp_path / "folder-cache", progress=False, state_dir=tmp_path / "state")
    url = server.dicomweb_url if kind == "dicomweb" else server.dimse_url
    opts = PacsOptions(query=PacsQuery.parse(["Modality=CT,MR"]))
    pulled = load_site(url, 32, cache_dir=tmp_path / "pacs-cache", progress=False, state_dir=tmp_path / "state",
                       source_options=opts)
    mods = np.asarray(folder.labels["modality"])
    want = np.isin(mods, ["CT", "MR"])
    assert (np.asarray(pulled.labels["modality"]) != "US").all()  # the query kept the US file out
    assert len(pulled) == int(want.sum()) == 10 + 10 + 2  # CT slices + enhanced MR frames + enhanced CT frames
    a = np.asarray(folder.images)[want]
    b = np.asarray(pulled.images)
    ka = sorted(range(len(a)), key=lambda i: a[i].tobytes())
    kb = sorted(range(len(b)), key=lambda i: b[i].tobytes())
    assert np.array_equal(a[ka], b[kb])  # every frame pixel-equal
    assert len(set(pulled.series_ids.tolist())) == len(set(folder.series_ids[want].tolist()))
