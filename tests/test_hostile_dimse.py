"""A hostile DIMSE PACS (a real pynetdicom SCP on loopback): C-FIND answers without end, C-GET sends an
instance far over the pixel budget. The site's pull stops at --max-listed and refuses the oversized
instance (nothing stored)."""

from __future__ import annotations

import itertools

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from fedrad.common.sources.layout import open_pacs
from fedrad.common.sources.pacs import PacsError, PacsOptions, instance_byte_cap

CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.1.1", "1.2.826.0.1.3680043.10.999.9"


def _big_instance(nbytes: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.Rows, ds.Columns = "CR", 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(nbytes)  # far more than 64 x 64 pixels: the header lies
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    return ds


@pytest.fixture
def hostile_scp():
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    state = {"endless": True, "big": 0}

    def on_find(event):
        level = event.identifier.QueryRetrieveLevel
        for i in itertools.count() if state["endless"] else range(1):
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            ds.StudyInstanceUID, ds.StudyDate = (f"{STUDY}.{i}" if state["endless"] else STUDY), "20240101"
            if level in ("SERIES", "IMAGE"):
                ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = SERIES, "CR", "CHEST"
            if level == "IMAGE":
                ds.SOPInstanceUID, ds.SOPClassUID = SOP, CR
            if event.is_cancelled:
                return
            yield 0xFF00, ds

    def on_get(event):
        yield 1
        yield 0xFF00, _big_instance(state["big"])

    ae = AE(ae_title="HOSTILE")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    # the C-STORE sub-operations of a C-GET go back over the site's association (role selection)
    ae.add_supported_context(CR, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
    yield f"dimse://HOSTILE@127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def test_endless_c_find_stops_at_max_listed(hostile_scp, tmp_path):
    url, _ = hostile_scp
    reader = open_pacs(url, cache_dir=tmp_path, options=PacsOptions(max_listed=50, rate=10_000, timeout=20))
    with pytest.raises(PacsError, match="listed more than 50 instances"):
        reader.list_items()


@pytest.mark.slow
def test_oversized_c_get_instance_is_refused(hostile_scp, tmp_path):
    url, state = hostile_scp
    state["endless"] = False
    cap = instance_byte_cap(1 << 10)  # a tiny pixel budget: the cap is the header slack (16 MiB)
    state["big"] = cap + (4 << 20)
    reader = open_pacs(url, max_pixels=1 << 10, cache_dir=tmp_path,
                       options=PacsOptions(rate=10_000, timeout=5))  # the abort ends the C-GET at the timeout
    listing = reader.list_items()
    assert not listing.items and reader.pull.failed == 1
    (problem,) = listing.skipped
    assert f"more than the {cap} bytes allowed" in problem.detail, problem.detail
    assert not list(reader.store.root.glob("*.dcm"))
