"""The site's store of released foundation weights: `<state-dir>/releases/<release-id>/`.

A bundle arrives as bytes (fedrad.client.app.release_handler). Before any byte is written, its manifest's
signature is checked with the site's own consortium key, every file is checked in memory against the size
and sha256 the signed manifest states (a file it does not list is refused), and the release is checked
against the runs this site took part in, the releases it already holds (no rollback) and the site's quota
of held releases. Only then are the files written into a hidden temporary folder in the state directory,
verified there once more (common.bundle: the stored bytes, and the weights parse), and renamed into
`releases/`. Any refusal before that writes nothing; one after it removes the temporary folder. The store
is also what `fedrad releases` lists and what `--release latest|ID` resolves.

Runs taken part in are recorded in `<state-dir>/runs_joined.json` each time this site answers a training
message (run id and run key, as a release manifest names them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.client.site.site_state import JOINED_FILE, RELEASES_DIRNAME, SiteState, SiteStateError, locked
from fedrad.common.atomic import PRIVATE_FILE, atomic_write_json
from fedrad.common.bundle import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_WEIGHTS_BYTES,
    SIGNATURE,
    SIGNATURE_BYTES,
    WEIGHTS,
    BundleVerificationError,
    ReleasePolicy,
    parse_created,
    sha256_bytes,
    signed_files,
    verify_bundle,
    verify_manifest_bytes,
)
from fedrad.common.release_wire import (
    MAX_CARD_BYTES,
    MAX_CONFIG_BYTES,
    MODEL_CARD,
    REQUIRED_FILES,
    TIMM_CONFIG,
    ReleaseCode,
    manifest_release_id,
)

INCOMING_PREFIX = ".incoming-"
# The site's quota of held releases (node options --max-releases / --max-release-gib, node-config keys
# below): a release beyond it is refused (REFUSED_QUOTA) until the site removes an older one itself; nothing
# held is ever deleted for a newcomer. Five backbones of a few hundred MB each fit a modest disk.
QUOTA_COUNT_KEY, QUOTA_BYTES_KEY = "max-releases", "max-release-bytes"
DEFAULT_MAX_RELEASES = 5
DEFAULT_MAX_RELEASE_BYTES = 20 << 30
FILE_LIMITS = {WEIGHTS: MAX_WEIGHTS_BYTES, MANIFEST: MAX_MANIFEST_BYTES, SIGNATURE: SIGNATURE_BYTES,
               MODEL_CARD: MAX_CARD_BYTES, TIMM_CONFIG: MAX_CONFIG_BYTES}


class ReleaseRefused(Exception):
    """The bundle is not stored: `code` is what the coordinator gets, the message what the site's audit keeps."""

    def __init__(self, code: ReleaseCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class ReleaseQuota:
    """How many releases, and how many bytes of them, this site keeps at most."""

    max_releases: int = DEFAULT_MAX_RELEASES
    max_bytes: int = DEFAULT_MAX_RELEASE_BYTES

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> ReleaseQuota:
        """From node-config `max-releases` / `max-release-bytes` (missing or empty: the default)."""
        count, size = node_config.get(QUOTA_COUNT_KEY), node_config.get(QUOTA_BYTES_KEY)
        return cls(int(count) if count not in (None, "") else DEFAULT_MAX_RELEASES,
                   int(size) if size not in (None, "") else DEFAULT_MAX_RELEASE_BYTES)


@dataclass(frozen=True)
class HeldRelease:
    """A release in the site's store (its manifest was verified when it was stored)."""

    release_id: str
    path: Path
    run_id: str
    run_key: str
    sequence: int
    created: str
    model: str

    @property
    def order(self) -> tuple[str, int]:
        """Newest last: signing time (UTC text sorts as time), then the release number."""
        return self.created, self.sequence


def releases_dir(state_root: Path) -> Path:
    return Path(state_root) / RELEASES_DIRNAME


# -- runs this site took part in --------------------------------------------------------------------------
def _read_joined(state: SiteState) -> dict[str, Any]:
    path = state.root / JOINED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"runs": {}}
    except (OSError, ValueError) as exc:
        raise SiteStateError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise SiteStateError(f"{path}: not a fedrad runs-joined file")
    return data


def record_participation(state: SiteState, run_id: int | str, run_key: str | None) -> None:
    """Note that this site answered a training message of run `run_id` (key `run_key`); idempotent."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with locked(state):
        data = _read_joined(state)
        entry = data["runs"].setdefault(str(run_id), {"first": now})
        if run_key:
            entry["run_key"] = str(run_key)
        entry["last"] = now
        atomic_write_json(state.root / JOINED_FILE, data, mode=PRIVATE_FILE)


def took_part(state: SiteState, run_id: Any, run_key: Any) -> bool:
    """Whether this site answered a training message of the run a release names (by run id or run key)."""
    runs = _read_joined(state)["runs"]
    if run_id is not None and str(run_id) in runs:
        return True
    return bool(run_key) and any(e.get("run_key") == run_key for e in runs.values())


# -- what the store holds ----------------------------------------------------------------------------------
def held_releases(state_root: Path) -> list[HeldRelease]:
    """The releases in the store, oldest first (hidden temporary folders are skipped)."""
    folder = releases_dir(state_root)
    if not folder.is_dir():
        return []
    held = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            release = manifest["release"]
            held.append(HeldRelease(path.name, path, str(release["run_id"]), str(release.get("run_key") or ""),
                                    int(release["sequence"]), str(manifest["created"]), str(manifest["model"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a stored release (never verified): ignored, and `--release` cannot name it
    return sorted(held, key=lambda h: h.order)


def resolve_release(state_root: Path, name: str) -> Path:
    """The bundle folder `--release latest|ID` names in the store; FileNotFoundError (exit 2) when none."""
    held = held_releases(state_root)
    if not held:
        raise FileNotFoundError(f"--release {name}: no release in {releases_dir(state_root)} (has this site's node "
                                f"received one? `fedrad releases --state-dir {state_root}`)")
    if name == "latest":
        return held[-1].path
    for h in held:
        if h.release_id == name:
            return h.path
    raise FileNotFoundError(f"--release {name}: not in {releases_dir(state_root)} (held: "
                            f"{', '.join(h.release_id for h in held)})")


def judge_offer(state: SiteState, run_id: Any, run_key: Any, sequence: int, created: str,
                offered_id: str, quota: ReleaseQuota | None = None) -> ReleaseCode:
    """WANT, HAVE, or the refusal the site would give the offered release (from the offer's unsigned
    claims: this only spares a transfer; the bundle itself is checked again when it arrives)."""
    held = held_releases(state.root)
    if any(h.release_id == offered_id for h in held):
        return ReleaseCode.HAVE
    if not took_part(state, run_id, run_key):
        return ReleaseCode.REFUSED_NOT_PARTICIPANT
    if _rollback(held, str(run_id), str(run_key or ""), sequence, created):
        return ReleaseCode.REFUSED_ROLLBACK
    if len(held) >= (quota or ReleaseQuota()).max_releases:  # full: the weights need not travel at all
        return ReleaseCode.REFUSED_QUOTA
    return ReleaseCode.WANT


def _rollback(held: list[HeldRelease], run_id: str, run_key: str, sequence: int, created: str) -> str | None:
    """Why a release is older than one held (same run: lower sequence; any run: signed earlier), or None."""
    same = [h for h in held if h.run_id == run_id or (run_key and h.run_key == run_key)]
    policy = ReleasePolicy(min_sequence=max(h.sequence for h in same) + 1 if same else None,
                           min_created=parse_created(held[-1].created) if held else None)
    try:
        policy.check({"release": {"run_id": run_id, "run_key": run_key, "sequence": sequence}, "created": created,
                      "format": ""}, "the offered release")
    except (BundleVerificationError, ValueError) as exc:
        return str(exc)
    return None


# -- storing ------------------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def store_release(state: SiteState, files: dict[str, bytes], pubkey,
                  quota: ReleaseQuota | None = None) -> tuple[ReleaseCode, str]:
    """Verify and store a received bundle: (STORED or HAVE, release id), or ReleaseRefused.

    `pubkey`: the site's consortium key (PEM path or key object). Nothing is written before the signed
    manifest, every file's size and hash, participation, rollback and `quota` have passed.
    """
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED, f"incomplete bundle: {', '.join(missing)} missing")
    manifest = _verify_in_memory(files, pubkey)
    state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with locked(state):
        rid = _judge(state, manifest, quota or ReleaseQuota(), sum(len(d) for d in files.values()))
        if rid is None:
            return ReleaseCode.HAVE, manifest_release_id(manifest)
        incoming = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=state.root))
        try:
            for name, data in files.items():
                _write_file(incoming / name, data)
            _verify(incoming, pubkey)
            return _place(state, incoming, rid)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)  # gone after the rename; removed on any refusal


def _verify_in_memory(files: dict[str, bytes], pubkey) -> dict[str, Any]:
    """The signed manifest, once every received file is one it lists, with the size and sha256 it states."""
    try:
        manifest = verify_manifest_bytes(files[MANIFEST], files[SIGNATURE], pubkey, "the received release")
    except BundleVerificationError as exc:
        raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED, str(exc)) from None
    listed = signed_files(manifest)
    for name, data in files.items():
        if name in (MANIFEST, SIGNATURE):
            continue
        entry = listed.get(name)
        if entry is None:  # covered by nothing: refused rather than stored beside the bundle
            raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED, f"{name}: not listed in the signed manifest")
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED,
                                 f"{name}: {len(data)} bytes that are not the file the signed manifest lists "
                                 f"({entry['bytes']} bytes, sha256 {entry['sha256'][:16]}...)")
    absent = sorted(set(listed) - set(files))
    if absent:
        raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED, f"incomplete bundle: {', '.join(absent)} missing")
    return manifest


def _verify(incoming: Path, pubkey) -> dict[str, Any]:
    """The written files once more, from disk (and the weights parse as safetensors)."""
    try:
        return verify_bundle(incoming, pubkey)
    except BundleVerificationError as exc:
        raise ReleaseRefused(ReleaseCode.REFUSED_UNVERIFIED, str(exc)) from None


def _judge(state: SiteState, manifest: dict[str, Any], quota: ReleaseQuota, size: int) -> str | None:
    """The release id to store; None when it is already held; ReleaseRefused for a run this site did not
    take part in, a rollback, or a release over the site's quota."""
    try:
        rid = manifest_release_id(manifest)
    except ValueError as exc:
        raise ReleaseRefused(ReleaseCode.REFUSED_NOT_PARTICIPANT, str(exc)) from None
    release = manifest["release"]
    held = held_releases(state.root)
    if any(h.release_id == rid for h in held):
        return None
    if not took_part(state, release["run_id"], release.get("run_key")):
        raise ReleaseRefused(ReleaseCode.REFUSED_NOT_PARTICIPANT,
                             f"release {rid}: this site took no part in run {release['run_id']}")
    why = _rollback(held, str(release["run_id"]), str(release.get("run_key") or ""), release["sequence"],
                    manifest["created"])
    if why:
        raise ReleaseRefused(ReleaseCode.REFUSED_ROLLBACK, f"release {rid}: {why}")
    held_bytes = sum(f.stat().st_size for h in held for f in h.path.iterdir() if f.is_file())
    if len(held) >= quota.max_releases or held_bytes + size > quota.max_bytes:
        raise ReleaseRefused(ReleaseCode.REFUSED_QUOTA,
                             f"release {rid}: this site holds {len(held)} release(s), {held_bytes} bytes; its quota "
                             f"is {quota.max_releases} releases, {quota.max_bytes} bytes (remove an older one from "
                             f"{releases_dir(state.root)}, or raise --max-releases / --max-release-gib)")
    return rid


def _place(state: SiteState, incoming: Path, rid: str) -> tuple[ReleaseCode, str]:
    """The rename into the store (checked by `_judge` under the same lock)."""
    target = releases_dir(state.root)
    target.mkdir(exist_ok=True, mode=0o700)
    os.rename(incoming, target / rid)
    return ReleaseCode.STORED, rid


def bundle_folder(bundle: str | None, release: str | None, state_dir: str | None) -> str:
    """`fedrad finetune/embed/export`: the bundle folder, given as BUNDLE or as `--release latest|ID` from the site's
    store (`--state-dir`); ValueError (exit 2) when neither or both are given. It is still verified on loading."""
    if bool(bundle) == bool(release):
        raise ValueError("give either a BUNDLE folder or --release latest|ID (with --state-dir), not both or neither")
    if bundle:
        return str(bundle)
    if not state_dir:
        raise ValueError(f"--release {release}: give --state-dir, the site's state folder (as `fedrad node` printed)")
    return str(resolve_release(Path(state_dir), str(release)))


__all__ = ["HeldRelease", "JOINED_FILE", "RELEASES_DIRNAME", "ReleaseQuota", "ReleaseRefused", "bundle_folder",
           "held_releases", "judge_offer", "record_participation", "releases_dir", "resolve_release",
           "store_release", "took_part"]
