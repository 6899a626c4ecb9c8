"""A DICOMweb PACS (`dicomweb+https://pacs.example/dicom-web`): QIDO-RS lists, WADO-RS fetches (dicomweb-client).

Instances are asked for in the transfer syntax they are stored in (`transfer-syntax=*`), so the file in the
site's store holds the PACS's own pixel bytes and decodes exactly like the same file exported to a folder.
TLS certificates are always verified (the system CAs, or `ca_bundle`; never a CA named by the environment);
credentials come from PacsOptions.

The PACS is not trusted to be well-behaved: every response is read through BoundedSession (no redirect
followed, at most a set number of bytes read, whatever Content-Length claims), a listing stops at
--max-listed instances and at a page the PACS already sent (a server ignoring `offset` pages forever), and
an instance larger than the pixel budget plus header slack is refused while it arrives.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from urllib.parse import urlsplit

import requests

from fedrad.common.sources.budget import DEFAULT_MAX_PIXELS
from fedrad.common.sources.pacs import (
    MAX_LIST_RESPONSE_BYTES,
    PacsError,
    PacsOptions,
    PacsReader,
    Remote,
    read_credentials,
)

STUDY, SERIES, SOP, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
MODALITY, BODY_PART, STUDY_DATE = "00080060", "00180015", "00080020"
PAGE = 1000  # QIDO results per request


class BoundedSession(requests.Session):
    """A requests Session that follows no redirect and reads at most `max_bytes` of any response body.

    dicomweb-client reads whole bodies (`response.content`, `.json()`); this session streams the body first
    and stops at the cap, so a PACS sending gigabytes costs at most `max_bytes`. No environment settings
    (trust_env off): REQUESTS_CA_BUNDLE would silently replace --ca-bundle, .netrc would add credentials the
    site did not give, and a proxy for the internet is not the way to the hospital PACS."""

    def __init__(self, max_bytes: int, what: str) -> None:
        super().__init__()
        self.trust_env = False
        self.max_bytes, self.what = int(max_bytes), what

    def request(self, method, url, *args, **kwargs):  # noqa: ANN001, ANN201 - requests' own signature
        kwargs["allow_redirects"], kwargs["stream"] = False, True
        response = super().request(method, url, *args, **kwargs)
        try:
            if response.is_redirect or 300 <= response.status_code < 400:
                raise PacsError(f"the PACS answered a {self.what} with a redirect (HTTP {response.status_code}): "
                                "not followed (give the final URL)")
            claimed = response.headers.get("Content-Length", "")
            if claimed.isdigit() and int(claimed) > self.max_bytes:
                raise PacsError(f"{self.what}: the PACS announced {int(claimed)} bytes, more than the "
                                f"{self.max_bytes} allowed")
            body = bytearray()
            for chunk in response.iter_content(1 << 16):
                body += chunk
                if len(body) > self.max_bytes:
                    raise PacsError(f"{self.what}: the PACS sent more than the {self.max_bytes} bytes allowed")
            response._content = bytes(body)  # what requests itself sets once a body is read
            response._content_consumed = True
        finally:
            response.close()
        return response


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

    def _client(self, max_bytes: int, what: str):
        from dicomweb_client.api import DICOMwebClient

        session = BoundedSession(max_bytes, what)
        session.verify = self.options.ca_bundle or True  # never off; a CA only from --ca-bundle
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

    def _search(self, client, filters: dict, found: list[Remote], before: int) -> int:
        """Page through one QIDO query, appending what the query accepts to `found`; returns the instances
        the PACS listed. Stops (PacsError) past --max-listed listed instances (`before` from earlier queries of
        this listing) or at a page already sent (a digest of its UIDs: a few bytes a page, not the pages)."""
        q, listed, seen = self.options.query, 0, set()
        while True:
            self.rate.wait()
            page = client.search_for_instances(search_filters=filters, limit=PAGE, offset=listed,
                                               fields=[SOP_CLASS, MODALITY, BODY_PART, STUDY_DATE])
            if not isinstance(page, list) or len(page) > PAGE:
                raise PacsError(f"DICOMweb query: the PACS sent {len(page) if isinstance(page, list) else 'no'} "
                                f"results where at most {PAGE} were asked for")
            rows = [obj if isinstance(obj, dict) else {} for obj in page]
            digest = hashlib.sha256("\n".join(_value(o, SOP) for o in rows).encode()).digest()
            if rows and digest in seen:
                raise PacsError(f"DICOMweb query: the PACS sent the same page again at offset {listed} (it "
                                "ignores the offset): stopped")
            seen.add(digest)
            listed += len(rows)
            self._check_listed(before + listed)
            found.extend(Remote(_value(o, SOP), _value(o, STUDY), _value(o, SERIES), _value(o, SOP_CLASS))
                         for o in rows if q.accepts(_value(o, MODALITY), _value(o, BODY_PART), _value(o, STUDY_DATE)))
            if len(rows) < PAGE:
                return listed

    def _list_remote(self) -> list[Remote]:
        q = self.options.query
        base: dict[str, str] = {"StudyDate": q.study_date} if q.study_date else {}
        combos = [dict(base, **({"Modality": m} if m else {}), **({"BodyPartExamined": b} if b else {}))
                  for m in (q.modalities or ("",)) for b in (q.body_parts or ("",))]
        client = self._client(MAX_LIST_RESPONSE_BYTES, "DICOMweb query")
        found: list[Remote] = []
        listed = 0
        try:
            for filters in combos:
                listed += self._search(client, filters, found, listed)
        except PacsError:
            raise
        except Exception as exc:  # requests/HTTP errors: one line, no secret (requests never prints headers)
            raise PacsError(f"DICOMweb query failed: {_why(exc)}") from None
        return found

    def _fetch_batch(self, batch: Sequence[Remote], done: dict[str, str]) -> None:
        import pydicom

        client = self._client(self.max_instance_bytes, "instance")
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
