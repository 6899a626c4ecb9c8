"""What the DICOMweb and DIMSE readers share: the query, the limits, credentials and the site-local instance store.

A PACS reader lists instances with a query, fetches the ones the site does not hold yet into a local instance
store (`<cache>/pacs/<hash of the source>/<SOP Instance UID>.dcm`, each file written to a temp name and renamed,
so a file that exists is complete), and then hands those files to the same DICOM decode path as a folder.
That makes a pull incremental and resumable for free: a second pull fetches only instances not in the store,
and a pull cut short (the max-instances limit, a crash, Ctrl-C) continues where it stopped.
Nothing about the PACS leaves the site: its URL, AE titles, UIDs and queries live in this store and the
site's own logs; the secret (password / token) is read from a file or an environment variable, never taken
from the command line and never logged.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.common.atomic import PRIVATE_FILE, atomic_write_bytes
from fedrad.common.sources.base import Item, Listing, Reader
from fedrad.common.sources.budget import BYTES_PER_PIXEL_BUDGET, DEFAULT_MAX_PIXELS
from fedrad.common.sources.dicom_folder import dicom_check, dicom_entry
from fedrad.common.sources.walk import Problem

SCHEMES = ("dicomweb+http://", "dicomweb+https://", "dimse://")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DATE_RE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
QUERY_KEYS = {"modality": "Modality", "bodypartexamined": "BodyPartExamined", "bodypart": "BodyPartExamined",
              "body_part": "BodyPartExamined"}
# Safe defaults: a node never floods the hospital's PACS.
DEFAULT_MAX_INSTANCES = 1000  # per pull; the next pull continues
# A hostile or broken PACS must not exhaust the node: at most this many instances listed per pull (a query
# matching more is refused: narrow it or raise --max-listed), at most this many bytes per listing response,
# and an instance may be as large as the pixel budget allows plus this much for its header.
DEFAULT_MAX_LISTED = 100_000
MAX_LIST_RESPONSE_BYTES = 4 << 20  # one QIDO page of 1000 instances is ~0.6 MB; parsed JSON stays < ~100 MB
HEADER_SLACK_BYTES = 16 << 20
DEFAULT_CONCURRENCY = 2  # parallel HTTP connections / DIMSE associations
DEFAULT_RATE = 20.0  # requests per second to the PACS, all connections together
DEFAULT_CALLING_AET = "FEDRAD"
DEFAULT_TIMEOUT = 60.0
CONFIG_PREFIX = "source-"
log = logging.getLogger("fedrad.sources.pacs")


class PacsError(ValueError):
    """The PACS cannot be used as given (bad URL, option, credentials file; unreachable; refused).

    A ValueError so that the CLI prints it as one line with exit code 2. Never holds a secret."""


def instance_byte_cap(max_pixels: int) -> int:
    """The most bytes one fetched instance may hold: its pixels at the budget, plus header slack."""
    return int(max_pixels) * BYTES_PER_PIXEL_BUDGET + HEADER_SLACK_BYTES


def is_source_url(text: str) -> bool:
    """True for a PACS source (`dicomweb+http(s)://...`, `dimse://AET@host:port`), False for a folder path."""
    return str(text).lower().startswith(SCHEMES)


def _date(text: str, what: str) -> str:
    m = DATE_RE.match(text.strip())
    if not m:
        raise PacsError(f"{what} {text!r}: expected a date YYYY-MM-DD")
    return "".join(m.groups())


@dataclass(frozen=True)
class PacsQuery:
    """Which instances to pull: modality and body-part values (any of), and a study-date range (inclusive)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    since: str = ""  # YYYYMMDD or ''
    until: str = ""

    @classmethod
    def parse(cls, terms: Iterable[str] = (), since: str | None = None, until: str | None = None) -> PacsQuery:
        """From `--query Modality=CR,DX --query BodyPartExamined=CHEST --since 2020-01-01 --until ...`
        (terms may also be joined by ';')."""
        values: dict[str, list[str]] = {"Modality": [], "BodyPartExamined": []}
        for term in (t for raw in terms for t in str(raw).split(";")):
            if not term.strip():
                continue
            key, sep, val = term.partition("=")
            name = QUERY_KEYS.get(key.strip().lower())
            if not sep or name is None:
                raise PacsError(f"--query {term.strip()!r}: expected Modality=V1,V2 or BodyPartExamined=V1,V2")
            for v in val.split(","):
                v = v.strip().upper()
                if not re.fullmatch(r"[A-Z0-9 _]{1,16}", v):
                    raise PacsError(f"--query {term.strip()!r}: {v!r} is not a DICOM code string")
                values[name].append(v)
        lo = _date(since, "--since") if since else ""
        hi = _date(until, "--until") if until else ""
        if lo and hi and lo > hi:
            raise PacsError(f"--since {since} is after --until {until}")
        return cls(tuple(dict.fromkeys(values["Modality"])), tuple(dict.fromkeys(values["BodyPartExamined"])), lo, hi)

    @property
    def study_date(self) -> str:
        """The DICOM date-range matching value ('' = any date)."""
        return f"{self.since}-{self.until}" if (self.since or self.until) else ""

    def accepts(self, modality: str, body_part: str, study_date: str) -> bool:
        """Client-side check of what the server returned (a PACS may ignore a key it does not support)."""
        if self.modalities and (modality or "").upper() not in self.modalities:
            return False
        if self.body_parts and (body_part or "").upper() not in self.body_parts:
            return False
        return self.accepts_date(study_date)

    def accepts_date(self, study_date: str) -> bool:
        """An instance without a study date is kept (the PACS already matched it, or it has none)."""
        if study_date and self.since and study_date < self.since:
            return False
        return not (study_date and self.until and study_date > self.until)

    def to_text(self) -> str:
        parts = []
        if self.modalities:
            parts.append("Modality=" + ",".join(self.modalities))
        if self.body_parts:
            parts.append("BodyPartExamined=" + ",".join(self.body_parts))
        return ";".join(parts)


@dataclass(frozen=True)
class PacsOptions:
    """Limits, credentials and query of one PACS source (CLI options, or node-config keys `source-*`)."""

    query: PacsQuery = field(default_factory=PacsQuery)
    max_instances: int = DEFAULT_MAX_INSTANCES
    concurrency: int = DEFAULT_CONCURRENCY
    rate: float = DEFAULT_RATE
    auth_file: str = ""  # 'user:password' (HTTP basic) or 'bearer TOKEN' / a bare token
    auth_env: str = ""  # name of an environment variable holding the same
    ca_bundle: str = ""  # PEM CA bundle for TLS (verification is always on)
    calling_aet: str = DEFAULT_CALLING_AET
    timeout: float = DEFAULT_TIMEOUT
    offline_ok: bool = False  # PACS unreachable: use the instances the last listing named (node rounds)
    max_listed: int = DEFAULT_MAX_LISTED  # most instances one listing may name (a hostile PACS pages forever)

    def __post_init__(self) -> None:
        if self.max_instances < 0:
            raise PacsError(f"max-instances {self.max_instances}: must be >= 0")
        if self.max_listed < 1:
            raise PacsError(f"max-listed {self.max_listed}: must be >= 1")
        if not 1 <= self.concurrency <= 32:
            raise PacsError(f"concurrency {self.concurrency}: must be 1..32")
        if not 0 < self.rate <= 10_000:
            raise PacsError(f"rate {self.rate}: must be > 0 requests/s")
        if not re.fullmatch(r"[ -\[\]-~]{1,16}", self.calling_aet) or not self.calling_aet.strip():
            raise PacsError(f"calling AE title {self.calling_aet!r}: 1-16 printable ASCII characters, no '\\'")

    _KEYS = {"query": "query", "since": "since", "until": "until", "max-instances": "max_instances",
             "concurrency": "concurrency", "rate": "rate", "auth-file": "auth_file", "auth-env": "auth_env",
             "ca-bundle": "ca_bundle", "calling-aet": "calling_aet", "timeout": "timeout",
             "max-listed": "max_listed"}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> PacsOptions:
        """From node-config style keys: source-query, source-since, source-until, source-max-instances,
        source-concurrency, source-rate, source-auth-file, source-auth-env, source-ca-bundle,
        source-calling-aet, source-timeout, source-max-listed (missing or empty: the default). A node trains
        on what its store holds when the PACS is briefly unreachable (offline_ok)."""
        got = {k: str(config.get(CONFIG_PREFIX + k, "") or "") for k in cls._KEYS}
        try:
            query = PacsQuery.parse([got["query"]], got["since"] or None, got["until"] or None)
            kw: dict[str, object] = {"query": query, "offline_ok": True}
            for key, cast in (("max-instances", int), ("concurrency", int), ("rate", float), ("timeout", float),
                              ("max-listed", int)):
                if got[key]:
                    kw[cls._KEYS[key]] = cast(got[key])
        except ValueError as exc:
            raise PacsError(f"node config: {exc}") from None
        for key in ("auth-file", "auth-env", "ca-bundle", "calling-aet"):
            if got[key]:
                kw[cls._KEYS[key]] = got[key]
        return cls(**kw)  # type: ignore[arg-type]

    def to_config(self) -> dict[str, str]:
        """The node-config keys that `from_config` reads back (no secret: only where to find it)."""
        vals = {"query": self.query.to_text(), "since": self.query.since, "until": self.query.until,
                "max-instances": str(self.max_instances), "concurrency": str(self.concurrency),
                "rate": f"{self.rate:g}", "auth-file": self.auth_file, "auth-env": self.auth_env,
                "ca-bundle": self.ca_bundle, "calling-aet": self.calling_aet, "timeout": f"{self.timeout:g}",
                "max-listed": str(self.max_listed)}
        return {CONFIG_PREFIX + k: v for k, v in vals.items() if v}


@dataclass(frozen=True)
class Credentials:
    scheme: str  # 'basic' | 'bearer'
    user: str = ""
    secret: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials({self.scheme}, user={'set' if self.user else 'none'})"


def read_credentials(options: PacsOptions) -> Credentials | None:
    """The HTTP credentials from `auth_file` or the variable `auth_env` (None: no authentication)."""
    if options.auth_file and options.auth_env:
        raise PacsError("give the PACS credentials in a file or an environment variable, not both")
    if options.auth_file:
        try:
            text = Path(options.auth_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PacsError(f"credentials file {options.auth_file}: cannot read it ({type(exc).__name__})") from None
        where = f"credentials file {options.auth_file}"
    elif options.auth_env:
        text = os.environ.get(options.auth_env, "").strip()
        where = f"environment variable {options.auth_env}"
        if not text:
            raise PacsError(f"{where} is not set or empty")
    else:
        return None
    line = text.splitlines()[0].strip() if text else ""
    head, _, rest = line.partition(" ")
    if head.lower() == "bearer" and rest.strip():
        return Credentials("bearer", secret=rest.strip())
    if head.lower() == "basic" and ":" in rest:
        user, _, pw = rest.strip().partition(":")
        return Credentials("basic", user, pw)
    if ":" in line and " " not in line:
        user, _, pw = line.partition(":")
        return Credentials("basic", user, pw)
    if line and " " not in line:
        return Credentials("bearer", secret=line)
    raise PacsError(f"{where}: expected 'USER:PASSWORD', 'basic USER:PASSWORD' or 'bearer TOKEN'")


class PullCancelled(BaseException):
    """Raised in fetch threads once the pull is interrupted (not an Exception: per-instance handlers let it
    through, so every thread stops at its next request)."""


class RateLimit:
    """At most `rate` requests per second over all threads (evenly spaced, no bursts); every request of a
    pull passes here, so it is also where a cancelled pull stops."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / float(rate)
        self._next = time.monotonic()
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def wait(self) -> None:
        if self.cancelled.is_set():
            raise PullCancelled
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + self.interval
        if at > now:
            time.sleep(at - now)


def source_key(url: str) -> str:
    """A short stable name for a source (its store folder): no URL in a path name."""
    return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()[:16]


def default_source_cache_dir(url: str) -> Path:
    """`$XDG_CACHE_HOME/fedrad/pacs-<hash>` (~/.cache): the cache of a PACS source when none is given."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedrad" / f"pacs-{source_key(url)}"


class InstanceStore:
    """Fetched instances as files named by SOP Instance UID; a file exists only once completely written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.root, 0o700)  # patient data: the site's service account only
        except OSError:
            pass

    def path(self, sop_uid: str) -> Path:
        return self.root / f"{sop_uid}.dcm"

    def has(self, sop_uid: str) -> bool:
        return self.path(sop_uid).is_file()

    def put(self, sop_uid: str, data: bytes) -> None:
        atomic_write_bytes(self.path(sop_uid), data, mode=PRIVATE_FILE)


@dataclass(frozen=True)
class Remote:
    """One instance as the PACS lists it."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str = ""


@dataclass
class PullReport:
    """What one pull did (site-local: it names nothing about the PACS)."""

    listed: int = 0  # instances matching the query
    had: int = 0  # already in the store before this pull
    fetched: int = 0
    fetched_bytes: int = 0
    failed: int = 0
    pending: int = 0  # left for the next pull (max-instances)
    list_seconds: float = 0.0
    fetch_seconds: float = 0.0
    offline: bool = False  # the PACS could not be queried: the last listing's stored instances were used

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PacsReader(Reader):
    """A PACS: list with the query, fetch what the store lacks (bounded), decode the stored files as DICOM.

    Items: item_id = SOP Instance UID, locator = the stored file, fingerprint '' (the cache hashes the
    bytes, as for a folder file). Subclasses implement `_list_remote` and `_fetch_batch`.
    """

    kind = "dicom"
    entry = staticmethod(dicom_entry)
    check = staticmethod(dicom_check)
    scheme = ""

    def __init__(self, url: str, cache_dir: str | os.PathLike[str], options: PacsOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(max_pixels)
        self.url = url.strip()
        self.options = options or PacsOptions()
        self.store = InstanceStore(Path(cache_dir) / "pacs" / source_key(self.url))
        self.root = self.store.root
        self.rate = RateLimit(self.options.rate)
        self.pull = PullReport()
        self.max_instance_bytes = instance_byte_cap(max_pixels)

    def _check_listed(self, count: int) -> None:
        """Stop a listing that names more instances than --max-listed (a PACS paging forever, or a query
        far wider than meant): one line, nothing fetched."""
        if count > self.options.max_listed:
            raise PacsError(f"the PACS listed more than {self.options.max_listed} instances for this query: "
                            "stopped (narrow it with --query/--since/--until, or raise --max-listed)")

    @abc.abstractmethod
    def _list_remote(self) -> list[Remote]:
        """Every instance matching the query (raises PacsError when the PACS cannot be queried)."""

    @abc.abstractmethod
    def _fetch_batch(self, batch: Sequence[Remote], done: dict[str, str]) -> None:
        """Fetch `batch` into the store over one connection; record failures as done[sop] = detail."""

    def _listing_path(self) -> Path:
        return self.store.root / ".listing.json"

    def _query_text(self) -> str:
        q = self.options.query
        return f"{q.to_text()}|{q.since}|{q.until}"

    def _remote(self) -> list[Remote]:
        """The PACS's listing, remembered in the store; if the PACS cannot be queried and `offline_ok`, the
        last remembered listing for the same query (its instances that are in the store)."""
        try:
            found = self._list_remote()
        except PacsError as exc:
            try:
                last = json.loads(self._listing_path().read_text(encoding="utf-8"))
            except (OSError, ValueError):
                last = {}
            if not self.options.offline_ok or last.get("query") != self._query_text():
                raise
            log.warning("PACS not reachable (%s): using the %d instances of the last listing", exc,
                        len(last.get("sops", [])))
            self.pull.offline = True
            return [Remote(sop, "", "") for sop in last.get("sops", []) if self.store.has(str(sop))]
        found = [r for r in found if UID_RE.match(r.sop_uid) and len(r.sop_uid) <= 64]
        payload = {"query": self._query_text(), "sops": sorted({r.sop_uid for r in found})}
        atomic_write_bytes(self._listing_path(), json.dumps(payload).encode("utf-8"), mode=PRIVATE_FILE)
        return found

    def list_items(self) -> Listing:
        t0 = time.perf_counter()
        self.pull = PullReport()
        remote = {r.sop_uid: r for r in self._remote()}
        order = sorted(remote.values(), key=lambda r: (r.study_uid, r.series_uid, r.sop_uid))
        t1 = time.perf_counter()
        missing = [r for r in order if not self.store.has(r.sop_uid)]
        todo = missing[: self.options.max_instances]
        todo_ids = {r.sop_uid for r in todo}
        failures: dict[str, str] = {}
        if todo:
            n = min(self.options.concurrency, len(todo))
            with ThreadPoolExecutor(n, thread_name_prefix="pacs-fetch") as pool:
                futures = [pool.submit(self._fetch_batch, todo[i::n], failures) for i in range(n)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:  # Ctrl-C / SIGTERM: threads stop at their next request; stored files stay
                    self.rate.cancelled.set()
                    raise
        fetched = [r for r in todo if self.store.has(r.sop_uid)]
        self.pull = PullReport(
            listed=len(order), had=len(order) - len(missing), fetched=len(fetched),
            fetched_bytes=sum(self.store.path(r.sop_uid).stat().st_size for r in fetched),
            failed=sum(1 for r in todo if not self.store.has(r.sop_uid)), pending=len(missing) - len(todo),
            list_seconds=round(t1 - t0, 3), fetch_seconds=round(time.perf_counter() - t1, 3),
            offline=self.pull.offline)
        out = Listing(files_seen=len(order))
        for r in order:
            if self.store.has(r.sop_uid):
                out.items.append(Item(r.sop_uid, str(self.store.path(r.sop_uid))))
            elif r.sop_uid in todo_ids:
                out.skipped.append(Problem(r.sop_uid, "unreadable",
                                           "fetch failed: " + failures.get(r.sop_uid, "not sent by the PACS")))
        return out

