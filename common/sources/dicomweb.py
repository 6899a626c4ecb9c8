"""A DICOMweb PACS (`dicomweb+https://pacs.example/dicom-web`): QIDO-RS lists, WADO-RS fetches (dicomweb-client).

Instances are asked for in the transfer syntax they are stored in (`transfer-syntax=*`), so the file in the
site's store holds the PACS's own pixel bytes and decodes exactly like the same file exported to a folder.
TLS certificates are always verified (the system CAs, or `ca_bundle`); credentials come from PacsOptions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from urllib.parse import urlsplit

from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.pacs import PacsError, PacsOptions, PacsReader, Remote, read_credentials

STUDY, SERIES, SOP, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
MODALITY, BODY_PART, STUDY_DATE = "00080060", "00180015", "00080020"
PAGE = 1000  # QIDO results per request


def _value(obj: dict, tag: str) -> str:
    vals = (obj.get(tag) or {}).get("Value") or [""]
    return str(vals[0]) if vals[0] is not None else ""


class DicomWebReader(PacsReader):
    scheme = "dicomweb"

    def __init__(self, url: str, cache_dir: str | os.PathLike[str], options: PacsOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(url, cache_dir, options, max_pixels)
        base = self.url.split("+", 1)[1]
        parts = urlsplit(base)
        if not parts.hostname:
            raise PacsError("DICOMweb source: expected dicomweb+https://HOST[:PORT]/PATH")
        if parts.username or parts.password:
            raise PacsError("DICOMweb source: put credentials in a file (--auth-file) or an environment "
                            "variable (--auth-env), never in the URL")
        self.base = base.rstrip("/")
        self.credentials = read_credentials(self.options)
        if self.options.ca_bundle and not os.path.isfile(self.options.ca_bundle):
            raise PacsError(f"CA bundle {self.options.ca_bundle}: no such file")

    def _client(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        # No environment settings: REQUESTS_CA_BUNDLE would silently replace --ca-bundle, .netrc would add
        # credentials the site did not give, and a proxy for the internet is not the way to the hospital PACS.
        session.trust_env = False
        session.verify = self.options.ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or True  # never off
        session.headers["Accept-Encoding"] = "identity"  # pixel data hardly compresses: spare the PACS's CPU
        headers = {}
        if self.credentials is not None:
            if self.credentials.scheme == "basic":
                session.auth = (self.credentials.user, self.credentials.secret)
            else:
                headers["Authorization"] = f"Bearer {self.credentials.secret}"
        client = DICOMwebClient(self.base, session=session, headers=headers, timeout=self.options.timeout)
        client.set_http_retry_params(retry=False)
        return client

    def _search(self, client, filters: dict) -> list[dict]:
        out: list[dict] = []
        while True:
            self.rate.wait()
            page = client.search_for_instances(search_filters=filters, limit=PAGE, offset=len(out),
                                               fields=[SOP_CLASS, MODALITY, BODY_PART, STUDY_DATE])
            out.extend(page)
            if len(page) < PAGE:
                return out

    def _list_remote(self) -> list[Remote]:
        q = self.options.query
        base: dict[str, str] = {"StudyDate": q.study_date} if q.study_date else {}
        combos = [dict(base, **({"Modality": m} if m else {}), **({"BodyPartExamined": b} if b else {}))
                  for m in (q.modalities or ("",)) for b in (q.body_parts or ("",))]
        client = self._client()
        found: list[Remote] = []
        try:
            for filters in combos:
                for obj in self._search(client, filters):
                    if q.accepts(_value(obj, MODALITY), _value(obj, BODY_PART), _value(obj, STUDY_DATE)):
                        found.append(Remote(_value(obj, SOP), _value(obj, STUDY), _value(obj, SERIES),
                                            _value(obj, SOP_CLASS)))
        except PacsError:
            raise
        except Exception as exc:  # requests/HTTP errors: one line, no secret (requests never prints headers)
            raise PacsError(f"DICOMweb query failed: {_why(exc)}") from None
        return found

    def _fetch_batch(self, batch: Sequence[Remote], done: dict[str, str]) -> None:
        import pydicom

        client = self._client()
        for r in batch:
            self.rate.wait()
            try:
                ds = client.retrieve_instance(r.study_uid, r.series_uid, r.sop_uid,
                                              media_types=(("application/dicom", "*"),))
                buf = io.BytesIO()
                pydicom.dcmwrite(buf, ds, enforce_file_format=False)  # as received: same elements, same bytes
                self.store.put(r.sop_uid, buf.getvalue())
            except Exception as exc:  # noqa: BLE001 - one instance failing must not stop the pull
                done[r.sop_uid] = _why(exc)


def _why(exc: BaseException) -> str:
    """One short line: the HTTP status, or the root cause of a connection/TLS failure (no URL, no secret)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status:
        return f"HTTP {status}"
    msg = " ".join(str(exc).split())
    cause = msg.rsplit("Caused by ", 1)[-1] if "Caused by " in msg else msg
    return f"{type(exc).__name__}: {cause[:200]}"
