"""The site's state directory: what must outlive the decoded-image cache (salt, DP ledger, audit, activity).

The cache is disposable (hospital IT may clear it to free disk); the state is not. Clearing the cache must
never reset the privacy spent (ε) nor change the patient pseudonyms (salt), so these live here, outside the
DICOM folder and outside the cache. This module is the one place that names the state's files.

`state.json` remembers which files the state has held. A ledger or salt that the state once had and that is
now gone (or unreadable) is an error that stops training: it is never silently recreated, because a new,
empty ledger would restart ε at 0 and a new salt would change every patient key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.common.atomic import PRIVATE_FILE, atomic_write_bytes, atomic_write_json, private_dir
from fedrad.common.file_lock import exclusive_lock
from fedrad.common.header_signals import SALT_FILE  # patient-pseudonym salt (0600), one name for all readers

STATE_FILE = "state.json"  # the site's id and which files it has held (the "expected" marks)
LEDGER_FILE = "dp_sample_ledger.json"  # the site's sample-DP ledger: every run's accounting, one total
ACTIVITY_FILE = "rounds.json"  # times of recent train / evaluate messages (max_rounds_per_day, max_evaluations_per_day)
AUDIT_DIRNAME = "audit"  # default audit folder (wire guard's outgoing.jsonl, refusals.jsonl)
REFUSALS_FILE = "refusals.jsonl"  # every refusal with the rule and its detail: read by the site, never sent
LOCK_FILE = ".lock"
NONCES_FILE = "run_nonces.json"  # each signed run's nonce -> the Flower run id that first used it (replays)
NONCE_KEEP_SECONDS = 30 * 86_400  # a nonce is forgotten this long after its not-after / last use (start refused anyway)
JOINED_FILE = "runs_joined.json"  # runs (id, key) this site trained in: releases are taken only from these
RELEASES_DIRNAME = "releases"  # received release bundles, one verified folder each (client/site/release_store.py)


class SiteStateError(ValueError):
    """The state directory is unusable (an expected file is missing or unreadable); the message says which."""


class StatementExpired(Exception):
    """A run this site has not served yet comes with a statement past its not-after: it may not START here.
    `rule` and the message say why (fedrad.common.run_signature.expiry_problem)."""

    def __init__(self, rule: str, why: str) -> None:
        super().__init__(why)
        self.rule = rule


def default_state_dir(data_dir: str | os.PathLike[str]) -> Path:
    """`$XDG_STATE_HOME/fedrad/<hash of the data path>` (default `~/.local/state/...`): one per site folder,
    outside the DICOM folder and outside the cache, so neither a cache purge nor a data re-export touches it."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode("utf-8")).hexdigest()[:16]
    return base / "fedrad" / digest


@dataclass(frozen=True)
class SiteState:
    """Paths of one site's state; `open_state` makes and checks the folder."""

    root: Path
    audit_dir: Path

    @property
    def marker(self) -> Path:
        return self.root / STATE_FILE

    @property
    def salt(self) -> Path:
        return self.root / SALT_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def activity(self) -> Path:
        return self.root / ACTIVITY_FILE

    @property
    def refusals(self) -> Path:
        return self.audit_dir / REFUSALS_FILE

    @property
    def nonces(self) -> Path:
        return self.root / NONCES_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE


def state_paths(node_config: Mapping[str, Any]) -> SiteState:
    """The SiteState named by node-config `state-dir` (else the default for `data-dir`) and `audit-dir`
    (else `<state>/audit`); nothing is created."""
    from fedrad.common.node_config import NodeConfig

    node = NodeConfig.of(node_config)
    state_dir, data_dir = node.state_dir, node.data_dir
    if not state_dir and not data_dir:
        raise SiteStateError("node-config has neither 'state-dir' nor 'data-dir': cannot place the site's state")
    root = (Path(state_dir) if state_dir else default_state_dir(data_dir)).absolute()
    audit = node.audit_dir
    return SiteState(root=root, audit_dir=Path(audit).absolute() if audit else root / AUDIT_DIRNAME)


def node_state_config(state_dir: str | None, data_dir: Path, cache_dir: str | None,
                      audit_dir: str | None) -> dict[str, str]:
    """At node start (`fedrad node`): the node-config entries `state-dir` and `audit-dir` (default
    `<state>/audit`), with the state folder made and checked now so a bad one fails before joining."""
    config = {"data-dir": str(data_dir), "state-dir": str(Path(state_dir).resolve()) if state_dir else "",
              "audit-dir": str(Path(audit_dir).resolve()) if audit_dir else ""}
    state = state_paths(config)
    from fedrad.client.site.site_data import default_cache_dir

    open_state(state, cache_dir or default_cache_dir(data_dir))
    return {"state-dir": str(state.root), "audit-dir": str(state.audit_dir)}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _read_marker(state: SiteState) -> dict[str, Any]:
    try:
        data = json.loads(state.marker.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SiteStateError(f"{state.marker}: the site's state file is unreadable ({exc}); restore the state "
                             "folder from backup") from None
    if not isinstance(data, dict) or "site_id" not in data:
        raise SiteStateError(f"{state.marker}: not a fedrad site state file")
    return data


def _check_ledger_readable(path: Path) -> None:
    """The ledger parses (the one reader, client/site/ledger_file.read_ledger); a SiteStateError names the file."""
    from fedrad.client.site.ledger_file import read_ledger

    try:
        read_ledger(path)
    except ValueError as exc:
        raise SiteStateError(str(exc)) from None


def open_state(state: SiteState, cache_dir: str | os.PathLike[str] | None = None) -> SiteState:
    """Create the state folder (0700) on first use and check it: every file it once held must still be there.

    `cache_dir` (the decoded-image cache) may not hold the state, since clearing it would reset ε; a ledger or
    salt left there by an older fedrad is adopted (copied) once, so an upgrade changes neither.
    Raises SiteStateError naming the file when the state cannot be trusted.
    """
    if cache_dir is not None and _inside(state.root, Path(cache_dir)):
        raise SiteStateError(f"state folder {state.root} is inside the decoded-image cache {cache_dir}: clearing "
                             "the cache would reset the site's privacy ledger; choose another --state-dir")
    private_dir(state.root)  # also a folder an older fedrad made 0755
    with locked(state):
        marker = _read_marker(state)
        if cache_dir is not None:
            _adopt_legacy(state, Path(cache_dir), marker)
        for key, path in (("salt", state.salt), ("ledger", state.ledger)):
            if marker.get(key) and not path.is_file():
                raise SiteStateError(f"{path} is missing but this site's state held it: restore it from backup "
                                     f"(never recreated: a new {key} would "
                                     f"{'restart epsilon at 0' if key == 'ledger' else 'change every patient key'})")
        if state.ledger.is_file():
            _check_ledger_readable(state.ledger)
        updated = dict(marker) if marker else {"format": 1, "site_id": uuid.uuid4().hex,
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for key, path in (("salt", state.salt), ("ledger", state.ledger)):
            if path.is_file():
                updated[key] = True
        if updated != marker:
            atomic_write_json(state.marker, updated, mode=PRIVATE_FILE)
    return state


def _adopt_legacy(state: SiteState, cache_dir: Path, marker: dict[str, Any]) -> None:
    """Copy a salt / ledger an older fedrad kept in the cache into the state, unless the state has its own."""
    for legacy, target, key in ((cache_dir / "salt.bin", state.salt, "salt"),
                                (cache_dir / LEDGER_FILE, state.ledger, "ledger")):
        if legacy.is_file() and not target.exists() and not marker.get(key):
            atomic_write_bytes(target, legacy.read_bytes(), mode=PRIVATE_FILE)


@contextlib.contextmanager
def locked(state: SiteState) -> Iterator[None]:
    """Exclusive lock on the site's state: ClientApp processes of concurrent runs read-modify-write the
    same ledger, and a lost update would under-count ε."""
    state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive_lock(state.lock):
        yield


def site_salt(state: SiteState) -> bytes:
    """The site's pseudonymisation salt from the state folder (created once, then only ever read)."""
    from fedrad.common.header_signals import load_or_create_salt

    open_state(state)
    salt = load_or_create_salt(state.salt)
    open_state(state)  # marks the salt as held, so losing it later is an error instead of a new salt
    return salt


def site_id(state: SiteState) -> str:
    """The site's random id from state.json (names the ledger's owner; never sent)."""
    return str(_read_marker(state).get("site_id", ""))


NONCE_REFRESH_SECONDS = 3600  # a served run's binding is refreshed at most hourly (one write an hour, not a round)


def bind_nonce(state: SiteState, nonce: str, run_id: int, not_after: int, now: float | None = None) -> int | None:
    """Bind a signed run's nonce to the Flower run id that first uses it here (under the state lock, 0600);
    returns that other run id when `run_id` is not it (a replay), None when the use is allowed.

    The statement's not-after bounds the run's START only: a nonce not bound yet whose not-after has passed
    raises StatementExpired (nothing is recorded), while a run bound before then is served on after it (a
    weeks-long run is not cut off mid-way). A served binding's `last_used` is refreshed at most hourly, and
    entries are dropped NONCE_KEEP_SECONDS after the later of their not-after and their last use, so the file
    stays bounded by the runs of the last month and a long run never loses its own binding."""
    from fedrad.common.run_signature import RunClaims, expiry_problem

    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    with locked(state):
        try:
            data = json.loads(state.nonces.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{state.nonces}: unreadable ({exc}); restore it from backup") from None
        if not isinstance(data, dict) or not isinstance(data.get("nonces", {}), dict):
            raise SiteStateError(f"{state.nonces}: not a fedrad nonce file")
        nonces = data.get("nonces", {})
        held = nonces.get(nonce)
        if held is not None:
            if int(held["run_id"]) != int(run_id):
                return int(held["run_id"])
            if now - float(held.get("last_used_time", 0)) < NONCE_REFRESH_SECONDS:
                return None
            nonces[nonce] = {**held, "last_used": stamp, "last_used_time": int(now)}
        else:
            problem = expiry_problem(RunClaims(nonce, int(not_after), ("train",)), now)
            if problem is not None:
                raise StatementExpired(*problem)
            nonces[nonce] = {"run_id": int(run_id), "not_after": int(not_after), "first_used": stamp,
                             "last_used": stamp, "last_used_time": int(now)}
        kept = {k: v for k, v in nonces.items()
                if max(float(v.get("not_after", 0)), float(v.get("last_used_time", 0))) + NONCE_KEEP_SECONDS >= now}
        atomic_write_json(state.nonces, {"format": 1, "nonces": kept}, mode=PRIVATE_FILE)
    return None


def count_activity(state: SiteState, limits: Mapping[str, int], now: float | None = None) -> tuple[str, int] | None:
    """Record one accepted data-touching message under each kind in `limits` ("train", "evaluate") unless a
    kind's limit (> 0) was already reached in the last 24 hours; returns (kind, count) of the first kind at its
    limit when refusing (then nothing is recorded), None when recorded. One locked step for all kinds."""
    now = time.time() if now is None else now
    with locked(state):
        try:
            raw = json.loads(state.activity.read_text())
            stamps = {str(k): [float(t) for t in v] for k, v in raw.items()}
        except FileNotFoundError:
            stamps = {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise SiteStateError(f"{state.activity}: unreadable ({exc})") from None
        recent = {k: [t for t in v if now - t < 86_400.0] for k, v in stamps.items()}
        for kind, limit in limits.items():
            if limit > 0 and len(recent.get(kind, [])) >= limit:
                return kind, len(recent[kind])
        for kind in limits:
            recent[kind] = [*recent.get(kind, []), now]
        atomic_write_bytes(state.activity, json.dumps(recent).encode("utf-8"), mode=PRIVATE_FILE)
    return None


__all__ = ["ACTIVITY_FILE", "AUDIT_DIRNAME", "JOINED_FILE", "LEDGER_FILE", "NONCES_FILE", "REFUSALS_FILE",
           "RELEASES_DIRNAME", "SALT_FILE", "STATE_FILE", "SiteState", "SiteStateError", "StatementExpired",
           "bind_nonce", "count_activity", "default_state_dir", "locked", "node_state_config", "open_state",
           "site_id", "site_salt", "state_paths"]
