"""A DIMSE PACS (`dimse://CALLED_AET@host:port`): C-FIND lists, C-GET fetches (pynetdicom).

C-GET needs no listening port at the site and no entry for the site in the PACS's list of move
destinations, which is what hospital IT hands out most easily. The query walks the hierarchy the way every
PACS supports it (studies by date, their series by modality/body part, their images). Each storage SOP class
is proposed once per transfer syntax fedrad decodes, so the PACS can send every instance in the syntax it
stores it in (no transcoding: the stored file decodes as the same file exported to a folder would).

Bounded like DICOMweb: every C-FIND level stops at --max-listed answers, and a C-GET whose received bytes
(counted per PDU as they arrive) pass the instance cap (pixel budget plus header slack) aborts the
association (the C-GET then ends at the DIMSE timeout). Limit, stated: pynetdicom reads one PDU whole
before any hook sees it, and a PDU may declare up to 4 GiB; the cap applies from the next PDU on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.pacs import UID_RE, PacsError, PacsOptions, PacsReader, Remote

# What fedrad's decode path reads (pydicom + pylibjpeg): offered to the PACS for every storage class.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
)
MAX_CONTEXTS = 128  # DICOM's limit per association (odd presentation context ids 1..255)
CLASSES_PER_ASSOCIATION = (MAX_CONTEXTS - 1) // len(TRANSFER_SYNTAXES)
URL_RE = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})/?$")


def parse_dimse_url(url: str) -> tuple[str, str, int]:
    """(called AE title, host, port) of `dimse://AET@host:port`."""
    m = URL_RE.match(url.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise PacsError("DIMSE source: expected dimse://CALLED_AET@HOST:PORT")
    return m["aet"], m["host"].strip("[]"), int(m["port"])


class DimseReader(PacsReader):
    scheme = "dimse"

    def __init__(self, url: str, cache_dir: str | os.PathLike[str], options: PacsOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(url, cache_dir, options, max_pixels)
        self.called_aet, self.host, self.port = parse_dimse_url(self.url)

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.options.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.options.timeout
        return ae

    def _associate(self, ae, roles=None, handlers=None):
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=roles or [],
                             evt_handlers=handlers or [])
        if not assoc.is_established:
            raise PacsError(f"DIMSE: no association with the PACS ({'rejected' if assoc.is_rejected else 'no answer'})")
        return assoc

    # -- C-FIND ----------------------------------------------------------------------------------
    def _find(self, assoc, keys: dict[str, str], counts: dict[str, int] | None = None) -> Iterator:
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ds = Dataset()
        for k, v in keys.items():
            setattr(ds, k, v)
        self.rate.wait()
        for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            if status is None:
                raise PacsError("DIMSE C-FIND: the PACS did not answer (timeout or association lost)")
            code = int(getattr(status, "Status", 0xFFFF))
            if code in (0xFF00, 0xFF01) and ident is not None:
                if counts is not None:  # answers per query level over the whole listing
                    level = keys["QueryRetrieveLevel"]
                    counts[level] = counts.get(level, 0) + 1
                    self._check_listed(counts[level])
                yield ident
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PacsError(f"DIMSE C-FIND refused by the PACS (status 0x{code:04X})")

    def _list_remote(self) -> list[Remote]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        q = self.options.query
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        try:
            assoc = self._associate(ae)
        except PacsError:
            raise
        except Exception as exc:  # noqa: BLE001 - socket errors: one line
            raise PacsError(f"DIMSE: cannot reach the PACS ({type(exc).__name__})") from None
        found: list[Remote] = []
        counts: dict[str, int] = {}
        try:
            studies = [(str(s.get("StudyInstanceUID", "")), str(s.get("StudyDate", "")))
                       for s in self._find(assoc, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                                   "StudyDate": q.study_date}, counts)]
            for study, date in studies:
                if not UID_RE.match(study) or not q.accepts_date(date):
                    continue
                series_keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study, "SeriesInstanceUID": "",
                               "Modality": "", "BodyPartExamined": ""}
                for s in list(self._find(assoc, series_keys, counts)):  # one C-FIND at a time on an association
                    series = str(s.get("SeriesInstanceUID", ""))
                    if not UID_RE.match(series) or not q.accepts(str(s.get("Modality", "")),
                                                                  str(s.get("BodyPartExamined", "")), date):
                        continue
                    image_keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                                  "SeriesInstanceUID": series, "SOPInstanceUID": "", "SOPClassUID": ""}
                    for i in self._find(assoc, image_keys, counts):
                        found.append(Remote(str(i.get("SOPInstanceUID", "")), study, series,
                                            str(i.get("SOPClassUID", ""))))
        except BaseException:
            assoc.abort()  # a listing stopped mid-answer: a release would wait for the rest of it
            raise
        assoc.release()
        return found

    # -- C-GET -----------------------------------------------------------------------------------
    def _fetch_batch(self, batch: Sequence[Remote], done: dict[str, str]) -> None:
        classes = sorted({r.sop_class for r in batch if UID_RE.match(r.sop_class)})
        for i in range(0, max(1, len(classes)), CLASSES_PER_ASSOCIATION):
            group = set(classes[i:i + CLASSES_PER_ASSOCIATION])
            part = [r for r in batch if r.sop_class in group]
            if part:
                self._get_group(part, sorted(group), done)
        for r in batch:
            if not UID_RE.match(r.sop_class):
                done[r.sop_uid] = "the PACS listed no valid SOP Class UID"

    def _get_group(self, batch: Sequence[Remote], classes: list[str], done: dict[str, str]) -> None:
        from pydicom.dataset import Dataset
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        wanted = {r.sop_uid for r in batch}
        received: set[str] = set()
        arriving = [0]  # bytes received since the current C-GET was sent

        def on_data(event) -> None:
            arriving[0] += len(event.data)
            if arriving[0] > self.max_instance_bytes and event.assoc.is_established:
                event.assoc.abort(block=False)  # from pynetdicom's own thread: queue the A-ABORT, do not wait

        def on_store(event) -> int:
            sop = str(event.request.AffectedSOPInstanceUID)
            if sop not in wanted:
                return 0xA900  # not asked for: refuse ("dataset does not match SOP class" family)
            if arriving[0] > self.max_instance_bytes:
                return 0xA700  # out of resources: over the instance cap, never stored
            self.store.put(sop, event.encoded_dataset())
            received.add(sop)
            return 0x0000

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in classes:
            for ts in TRANSFER_SYNTAXES:
                ae.add_requested_context(uid, ts)
        roles = [build_role(uid, scp_role=True) for uid in classes]
        try:
            assoc = self._associate(ae, roles, [(evt.EVT_C_STORE, on_store), (evt.EVT_DATA_RECV, on_data)])
        except Exception as exc:  # noqa: BLE001
            for r in batch:
                done[r.sop_uid] = f"no association ({type(exc).__name__})"
            return
        try:
            for r in batch:
                ds = Dataset()
                ds.QueryRetrieveLevel = "IMAGE"
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = r.study_uid, r.series_uid, r.sop_uid
                self.rate.wait()
                last = None
                arriving[0] = 0
                for status, _ident in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
                    if status is not None:
                        last = int(getattr(status, "Status", 0xFFFF))
                if arriving[0] > self.max_instance_bytes:
                    done[r.sop_uid] = f"C-GET: the PACS sent more than the {self.max_instance_bytes} bytes allowed"
                    received.discard(r.sop_uid)
                elif r.sop_uid not in received:
                    done[r.sop_uid] = "C-GET: not received" + (f" (status 0x{last:04X})" if last is not None else "")
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for r in batch:
            if r.sop_uid not in received and r.sop_uid not in done:
                done[r.sop_uid] = "C-GET: association ended before this instance"
