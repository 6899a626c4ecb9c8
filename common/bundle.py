"""Reading a signed foundation-weights bundle: check it, refuse old releases, load the very bytes checked.

Over 500 lines on purpose: one concern (a bundle is read, checked and loaded from the same bytes), whose
no-verify-then-load-race argument is easiest to audit in one file.

The verifying half of a release, shared by sites (`fedrad verify/finetune/embed`) and the operator (who
checks each bundle right after signing it); the signing half is `fedrad.server.release`.

A bundle is a folder with three files (four with its model card):

* `weights.safetensors`: the backbone's state_dict only, under timm's key names;
* `manifest.json`: how the weights were made and how to feed them, the sha256 and size of the weights file,
  and (format 2) the release it belongs to: `release.run_id`, `release.run_key` and `release.sequence`;
* `manifest.sig`: the raw 64-byte Ed25519 signature over the exact bytes of manifest.json. It also checks
  with plain OpenSSL: `openssl pkeyutl -verify -pubin -inkey K.pub -rawin -in manifest.json -sigfile manifest.sig`.
* `MODEL_CARD.md` (optional): what the weights are, were trained on and are for; when the manifest lists it
  (`card`: file, sha256, bytes) it is covered by the signature like the weights, and a changed card is refused.
* `config.json` (optional): timm's config, so `timm.create_model("local-dir:BUNDLE", pretrained=True)` rebuilds
  the backbone and `timm.data.resolve_data_config` gives its preprocessing (fedrad.common.timm_config). The
  manifest's `config` lists it like the card (a changed one is refused) or says why there is none
  (`file`: null, `reason`); a config.json the signed manifest does not list is refused.

Each file is read once: the signature is checked over the manifest bytes in memory, the weights are hashed
in memory and loaded from those same bytes, so swapping a file on disk during the check changes nothing.
Reads are bounded (manifest 1 MiB, signature 64 bytes, weights the size the signed manifest states).

Release order: `release.sequence` counts the releases made from one run directory (1, 2, ...; the operator
keeps the count in RUN_DIR/releases.jsonl); `created` (UTC, signed) orders releases across runs. A site
refuses an older bundle with a `ReleasePolicy` (`--expect-run`, `--min-sequence`, `--min-created`).

Sections, in the order a bundle passes them: bounded reading, the manifest's shape, the release policy,
verification, loading, and `fedrad verify`'s report. They stay in one module (~450 lines) on purpose: it is
the whole of what a site must trust before using weights, so it can be audited in one read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrad.common.keys import key_fingerprint, load_public_key, signature_valid

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CARD = "MODEL_CARD.md"
BUNDLE_FORMAT = "fedrad-bundle/2"  # 2: adds the `release` block (run id, run key, sequence)
FORMATS = ("fedrad-bundle/1", BUNDLE_FORMAT)
INTENSITY = "[0,1] grayscale, zero-padded square"
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
MAX_MANIFEST_BYTES = 1 << 20
SIGNATURE_BYTES = 64
MAX_CARD_BYTES = 1 << 20
CONFIG = "config.json"  # fedrad.common.timm_config writes it
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30  # unsigned (--insecure) files only; a signed manifest states the exact size
NORMS = ("batch", "group")


class BundleVerificationError(Exception):
    """The bundle is refused (signature, hash, manifest content, weights, or an older release); exit code 1.

    The message names the file and the check that failed.
    """


# -- reading ----------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes already in memory (the bytes that will be loaded, not a second read)."""
    return hashlib.sha256(data).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest: what is signed and written."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """All of `path` in one read, refusing (BundleVerificationError) a file longer than `limit` bytes.

    The read is sized by the open file (+1 to notice one growing meanwhile), never by `limit` alone:
    a signed manifest may state any size, and a buffer of that size must not be allocated on its word.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise BundleVerificationError(f"{path}: the {what} is larger than {limit} bytes")
            data = f.read(size + 1)
    except FileNotFoundError:
        raise BundleVerificationError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise BundleVerificationError(f"missing file: {path} is a folder, not the {what}") from None
    except OSError as exc:
        raise BundleVerificationError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if len(data) > limit:
        raise BundleVerificationError(f"{path}: the {what} is larger than {limit} bytes")
    return data


# -- the manifest's shape -----------------------------------------------------------------------------
# Field -> (accepted types, may be null). Ints exclude bool. Only what readers use is constrained.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), False),
    "model": ((str,), False),
    "in_chans": ((int,), False),
    "input_size": ((int,), True),
    "intensity": ((str,), False),
    "objective": ((str,), True),
    "norm": ((str,), False),
    "rounds": ((int,), False),
    "sites": ((int,), False),
    "examples_seen": ((int,), False),
    "privacy": ((dict,), False),
    "created": ((str,), False),
    "weights": ((dict,), False),
}
_RELEASE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "run_id": ((str,), False),
    "run_key": ((str,), True),
    "sequence": ((int,), False),
}


def _check_fields(obj: dict[str, Any], fields: dict[str, tuple[tuple[type, ...], bool]], where: str,
                  prefix: str = "") -> None:
    for name, (types, nullable) in fields.items():
        if name not in obj:
            raise BundleVerificationError(f"{where}: signed manifest lacks '{prefix}{name}'")
        value = obj[name]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise BundleVerificationError(
                f"{where}: signed manifest field '{prefix}{name}' is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in types)}")


def parse_created(text: str) -> datetime:
    """A manifest's `created` (UTC, 'YYYY-MM-DDTHH:MM:SSZ') as an aware datetime; ValueError otherwise."""
    return datetime.strptime(text, CREATED_FORMAT).replace(tzinfo=UTC)


def check_manifest(body: bytes, where: Path | str) -> dict[str, Any]:
    """The manifest as a dict whose fields have the types readers rely on, else BundleVerificationError.

    Run after the signature checked: a correctly signed manifest can still be malformed (a signer bug, or a
    key used to sign something else), and a site must refuse it with a reason rather than crash on it.
    """
    try:
        manifest = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleVerificationError(f"{where}: signed manifest is not valid UTF-8 JSON") from None
    if not isinstance(manifest, dict):
        raise BundleVerificationError(f"{where}: signed manifest is a JSON {type(manifest).__name__}, "
                                      f"not an object")
    _check_fields(manifest, _FIELDS, str(where))
    if manifest["format"] not in FORMATS:
        raise BundleVerificationError(f"{where}: unknown bundle format {manifest['format'][:40]!r} "
                                      f"(this fedrad reads {', '.join(FORMATS)})")
    if not manifest["model"] or manifest["in_chans"] < 1 or (manifest["input_size"] or 1) < 1:
        raise BundleVerificationError(f"{where}: signed manifest has an empty model or a size below 1")
    if manifest["norm"] not in NORMS:
        raise BundleVerificationError(f"{where}: signed manifest norm {manifest['norm'][:40]!r} is not "
                                      f"one of {', '.join(NORMS)}")
    weights = manifest["weights"]
    _check_fields(weights, {"file": ((str,), False), "sha256": ((str,), False), "bytes": ((int,), False)},
                  str(where), "weights.")
    sha = weights["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleVerificationError(f"{where}: signed manifest 'weights.sha256' is not a sha256 hex digest")
    if weights["file"] != WEIGHTS or weights["bytes"] < 0:
        raise BundleVerificationError(f"{where}: signed manifest 'weights' must name {WEIGHTS} with a size >= 0")
    if "card" in manifest:
        _check_card_entry(manifest["card"], where)
    if "config" in manifest:
        _check_config_entry(manifest["config"], where)
    try:
        parse_created(manifest["created"])
    except ValueError:
        raise BundleVerificationError(f"{where}: signed manifest 'created' is not a UTC time like "
                                      f"2026-01-31T12:00:00Z") from None
    if manifest["format"] == BUNDLE_FORMAT:
        release = manifest.get("release")
        if not isinstance(release, dict):
            raise BundleVerificationError(f"{where}: signed manifest lacks the 'release' object")
        _check_fields(release, _RELEASE_FIELDS, str(where), "release.")
        if release["sequence"] < 1:
            raise BundleVerificationError(f"{where}: signed manifest 'release.sequence' is below 1")
    return manifest


def _check_file_entry(entry: Any, where: Path | str, key: str, name: str, max_bytes: int) -> None:
    """A manifest block naming one extra file of the bundle (`card`: MODEL_CARD.md, `config`: config.json) with
    a sha256 and a size within bounds."""
    if not isinstance(entry, dict):
        raise BundleVerificationError(f"{where}: signed manifest '{key}' is not an object")
    _check_fields(entry, {"file": ((str,), False), "sha256": ((str,), False), "bytes": ((int,), False)},
                  str(where), f"{key}.")
    sha = entry["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleVerificationError(f"{where}: signed manifest '{key}.sha256' is not a sha256 hex digest")
    if entry["file"] != name or not 0 <= entry["bytes"] <= max_bytes:
        raise BundleVerificationError(f"{where}: signed manifest '{key}' must name {name} with a size of 0 to "
                                      f"{max_bytes} bytes")


def _check_card_entry(card: Any, where: Path | str) -> None:
    """The manifest's optional `card` block names MODEL_CARD.md."""
    _check_file_entry(card, where, "card", CARD, MAX_CARD_BYTES)


def _check_config_entry(entry: Any, where: Path | str) -> None:
    """The manifest's optional `config` block: config.json with a sha256 and size, or no file and a reason."""
    if isinstance(entry, dict) and entry.get("file") is None:
        if not isinstance(entry.get("reason"), str):
            raise BundleVerificationError(f"{where}: signed manifest 'config' names no file and gives no reason")
        return
    _check_file_entry(entry, where, "config", CONFIG, MAX_CONFIG_BYTES)


# -- rollback --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleasePolicy:
    """What a site insists on beyond a valid signature, so an older bundle signed by the same key is refused.

    expect_run: the run id or run key (`fedrad verify` prints both) the bundle must come from;
    min_sequence: the lowest release number accepted (releases of one run count 1, 2, ...);
    min_created: the earliest signing time accepted (UTC).
    """

    expect_run: str | None = None
    min_sequence: int | None = None
    min_created: datetime | None = None

    @classmethod
    def from_args(cls, expect_run: str | None = None, min_sequence: int | None = None,
                  min_created: str | None = None) -> ReleasePolicy:
        """From CLI strings; ValueError (exit 2) naming the option for a bad value."""
        when = None
        if min_created:
            try:
                when = datetime.fromisoformat(min_created.strip())
            except ValueError:
                raise ValueError(f"--min-created {min_created!r}: not a date like 2026-01-31 or "
                                 f"2026-01-31T12:00:00Z") from None
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if min_sequence is not None and min_sequence < 1:
            raise ValueError(f"--min-sequence {min_sequence}: must be >= 1")
        return cls(expect_run.strip() if expect_run else None, min_sequence, when)

    def check(self, manifest: dict[str, Any], where: Path | str) -> None:
        """BundleVerificationError ('rollback refused: ...') when the bundle is not the release asked for."""
        release = manifest.get("release") if isinstance(manifest.get("release"), dict) else None
        if (self.expect_run or self.min_sequence is not None) and release is None:
            raise BundleVerificationError(f"rollback refused: {where} carries no release run/sequence "
                                          f"(format {manifest.get('format')}, older than {BUNDLE_FORMAT})")
        if self.expect_run and self.expect_run not in (release["run_id"], release.get("run_key")):
            raise BundleVerificationError(
                f"rollback refused: {where} is from run {release['run_id']} (key {release.get('run_key')}), "
                f"not the expected run {self.expect_run}")
        if self.min_sequence is not None and release["sequence"] < self.min_sequence:
            raise BundleVerificationError(f"rollback refused: {where} is release #{release['sequence']}, "
                                          f"older than the minimum #{self.min_sequence}")
        if self.min_created is not None and parse_created(manifest["created"]) < self.min_created:
            raise BundleVerificationError(
                f"rollback refused: {where} was created {manifest['created']}, before the minimum "
                f"{self.min_created.strftime(CREATED_FORMAT)}")


# -- verification -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedBundle:
    """A checked bundle: its manifest and the exact weights bytes whose hash the signed manifest names."""

    path: Path
    manifest: dict[str, Any]
    weights: bytes
    card: bytes | None = None  # MODEL_CARD.md, when the signed manifest lists it (its hash checked)
    config: bytes | None = None  # timm's config.json, when the signed manifest lists it (its hash checked)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as tensors, parsed from the verified bytes (never re-read from disk)."""
        return parse_weights(self.weights, self.path / WEIGHTS, BundleVerificationError)


def parse_weights(data: bytes, where: Path | str, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """safetensors bytes -> state_dict, or `error` naming the file (a bad header is not a traceback)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise error(f"{where}: not a valid safetensors file ({str(exc)[:200]})") from None


def _public_key(pubkey):
    """A loaded Ed25519 public key, from a key object or a PEM file (KeyFileError, exit 2, for a bad file)."""
    if isinstance(pubkey, str | os.PathLike):
        return load_public_key(pubkey)
    return pubkey


def read_verified(bundle: str | os.PathLike[str], pubkey, policy: ReleasePolicy | None = None) -> VerifiedBundle:
    """Check the signature, the manifest's shape, the release policy and the weights hash; read each file once.

    `pubkey` is a PEM path or a loaded Ed25519 public key. Raises FileNotFoundError (no such bundle folder),
    KeyFileError (the key file) or BundleVerificationError (the bundle is refused).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"bundle folder {bundle} not found")
    public = _public_key(pubkey)
    body = read_bounded(bundle / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    sig = read_bounded(bundle / SIGNATURE, SIGNATURE_BYTES, "signature")
    if not (bundle / WEIGHTS).is_file():
        raise BundleVerificationError(f"missing file: {bundle / WEIGHTS}")
    if not signature_valid(public, sig, body):
        raise BundleVerificationError(_bad_signature(bundle, body, public, pubkey))
    manifest = check_manifest(body, bundle / MANIFEST)
    (policy or ReleasePolicy()).check(manifest, bundle)
    want = manifest["weights"]
    data = read_bounded(bundle / WEIGHTS, want["bytes"], "weights file")
    if len(data) != want["bytes"]:
        raise BundleVerificationError(
            f"weights size mismatch: {bundle / WEIGHTS} has {len(data)} bytes, the signed manifest says "
            f"{str(want['bytes'])[:24]} (file modified or corrupted)")
    got = _digest(data)
    if got != want["sha256"]:
        raise BundleVerificationError(
            f"weights hash mismatch: {bundle / WEIGHTS} has sha256 {got[:16]}..., the signed manifest says "
            f"{want['sha256'][:16]}... (file modified or corrupted)")
    return VerifiedBundle(bundle, manifest, data, _verified_card(bundle, manifest), _verified_config(bundle, manifest))


def _verified_extra(bundle: Path, want: dict[str, Any], name: str, max_bytes: int, what: str) -> bytes:
    """The bytes of an extra file the signed manifest lists (`want`: its sha256 and size), read bounded and
    checked against both."""
    data = read_bounded(bundle / name, max_bytes, what)
    if len(data) != want["bytes"] or sha256_bytes(data) != want["sha256"]:
        raise BundleVerificationError(
            f"{what} mismatch: {bundle / name} is not the {name} the signed manifest lists (sha256 "
            f"{want['sha256'][:16]}..., {want['bytes']} bytes): modified after signing")
    return data


def _verified_card(bundle: Path, manifest: dict[str, Any]) -> bytes | None:
    """MODEL_CARD.md's bytes when the signed manifest lists it, checked against its size and hash."""
    want = manifest.get("card")
    return None if want is None else _verified_extra(bundle, want, CARD, MAX_CARD_BYTES, "model card")


def _verified_config(bundle: Path, manifest: dict[str, Any]) -> bytes | None:
    """config.json's bytes when the signed manifest lists it (size and hash checked); a config.json it does
    not list is refused, since timm would load it beside the signed weights."""
    want = manifest.get("config") or {}
    if want.get("file") is None:
        if (bundle / CONFIG).exists():
            raise BundleVerificationError(f"unsigned file: {bundle / CONFIG} is not listed in the signed manifest "
                                          f"(timm would read it with these weights); remove it")
        return None
    return _verified_extra(bundle, want, CONFIG, MAX_CONFIG_BYTES, "timm config")


def _digest(data: bytes) -> str:
    """The weights hash (a seam the race test uses to swap the file right after hashing)."""
    return sha256_bytes(data)


def _bad_signature(bundle: Path, body: bytes, public, pubkey) -> str:
    expected = key_fingerprint(public)
    try:
        claimed = json.loads(body)["signer"]["public_key_sha256"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        claimed = None
    shown = pubkey if isinstance(pubkey, str | os.PathLike) else "the given key"
    if isinstance(claimed, str) and claimed and claimed != expected:
        return (f"signature invalid: wrong key: {bundle / MANIFEST} was signed by key {claimed[:16]}..., "
                f"not by {shown} ({expected[:16]}...)")
    return (f"signature invalid: {bundle / MANIFEST} or {SIGNATURE} was modified after signing "
            f"(does not verify with {shown})")


def verify_manifest_bytes(body: bytes, sig: bytes, pubkey, where: str | os.PathLike[str]) -> dict[str, Any]:
    """The signed manifest from bytes not yet on disk (a release arriving at a site): the signature first,
    then the manifest's shape; BundleVerificationError otherwise. The files it lists are not checked here."""
    public = _public_key(pubkey)
    if len(body) > MAX_MANIFEST_BYTES or len(sig) != SIGNATURE_BYTES or not signature_valid(public, sig, body):
        raise BundleVerificationError(_bad_signature(Path(where), body[:MAX_MANIFEST_BYTES], public, pubkey))
    return check_manifest(body, Path(where) / MANIFEST)


def signed_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """file name -> its signed entry ({file, sha256, bytes}) for every file a checked manifest lists."""
    return {entry["file"]: entry for entry in manifest.values()
            if isinstance(entry, dict) and {"file", "sha256", "bytes"} <= set(entry)}


def verify_bundle(bundle: str | os.PathLike[str], pubkey, policy: ReleasePolicy | None = None) -> dict[str, Any]:
    """The manifest of a bundle that passes `read_verified` and whose weights parse; raises otherwise."""
    verified = read_verified(bundle, pubkey, policy)
    _check_weights_parse(verified)
    return verified.manifest


def _check_weights_parse(verified: VerifiedBundle) -> None:
    """Signed weights that are not safetensors are refused at verify time, not when a site loads them."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        load(verified.weights)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise BundleVerificationError(f"{verified.path / WEIGHTS}: signed weights are not a valid safetensors "
                                      f"file ({str(exc)[:200]})") from None


# -- loading ----------------------------------------------------------------------------------------------
def read_manifest_unverified(bundle: Path) -> tuple[dict[str, Any], bytes]:
    """(manifest, weights bytes) of a bundle or a bare .safetensors file, unchecked (for --insecure).

    Bad files raise ValueError naming the file (exit 2): nothing here is trusted, so nothing is "refused".
    """
    from safetensors import SafetensorError, safe_open

    bundle = Path(bundle)
    if bundle.is_file():
        try:
            with safe_open(os.fspath(bundle), framework="numpy") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, ValueError, OSError) as exc:
            raise ValueError(f"{bundle}: not a valid safetensors file ({str(exc)[:200]})") from None
        size = meta.get("image_size")
        manifest = {"model": meta.get("model"), "in_chans": _int(meta.get("in_chans", 1), bundle),
                    "input_size": _int(size, bundle) if size else None, "intensity": INTENSITY,
                    "objective": meta.get("objective"), "norm": meta.get("norm", "batch"),
                    "weights": {"file": bundle.name}}
        return manifest, _read_unsigned(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"bundle {bundle} not found")
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle}: no {MANIFEST} (not a fedrad bundle)")
    try:
        manifest = json.loads(read_bounded(path, MAX_MANIFEST_BYTES, "manifest").decode("utf-8"))
    except (BundleVerificationError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not a readable JSON manifest ({str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: manifest is not a JSON object")
    return manifest, _read_unsigned(bundle / WEIGHTS)


def _int(value: Any, where: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: metadata value {str(value)[:40]!r} is not an integer") from None


def _read_unsigned(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_WEIGHTS_BYTES, "weights file")
    except BundleVerificationError as exc:
        raise ValueError(str(exc)) from None


def load_verified_backbone(bundle: str | os.PathLike[str], pubkey, insecure: bool = False,
                           policy: ReleasePolicy | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone in eval mode, manifest), built from the verified bytes. Verified unless `insecure`, which
    also accepts a bare .safetensors file. Signed weights that do not fit the model they name are refused."""
    bundle = Path(bundle)
    if insecure:
        print(f"fedrad: WARNING: using {bundle} WITHOUT signature verification (--insecure)", file=sys.stderr)
        manifest, data = read_manifest_unverified(bundle)
        where = bundle if bundle.is_file() else bundle / WEIGHTS
        state, error = parse_weights(data, where), ValueError
    else:
        if not pubkey:
            raise ValueError("no public key given: pass --pubkey (or --insecure to skip the check)")
        verified = read_verified(bundle, pubkey, policy)
        manifest, where, error = verified.manifest, bundle / WEIGHTS, BundleVerificationError
        state = verified.state_dict()
    return build_backbone(manifest, state, bundle, where, error), manifest


def build_backbone(manifest: dict[str, Any], state: dict[str, torch.Tensor], bundle: Path, where: Path,
                   error: type[Exception] = BundleVerificationError) -> nn.Module:
    """The manifest's backbone (eval mode) with `state` loaded strictly; `error` naming `where` if it does not fit."""
    from fedrad.common.models import create_backbone

    model = manifest.get("model")
    if not isinstance(model, str) or not model:
        raise error(f"{bundle}: the manifest/metadata names no model")
    try:
        backbone = create_backbone(model, in_chans=int(manifest.get("in_chans", 1)),
                                   image_size=manifest.get("input_size"), norm=str(manifest.get("norm", "batch")))
        backbone.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise error(f"{where}: weights do not load into {model[:60]} ({first})") from None
    return backbone.eval()


# -- `fedrad verify` ----------------------------------------------------------------------------------------
def describe(manifest: dict[str, Any], bundle: str, pubkey: str) -> str:
    """The lines `fedrad verify` prints for a bundle that passed."""
    m, p = manifest, manifest.get("privacy", {})
    r = m.get("release") or {}
    release = (f"run {r.get('run_id')} (key {r.get('run_key')}), release #{r.get('sequence')}" if r
               else f"no run/sequence ({m['format']})")
    return (f"OK {bundle}\n  signature: valid Ed25519 signature by {pubkey} over {MANIFEST}\n"
            f"  weights:   {WEIGHTS} sha256 {m['weights']['sha256']} matches the manifest\n"
            f"  card:      {_card_line(m)}\n"
            f"  timm:      {_config_line(m)}\n"
            f"  model:     {m['model']} in_chans={m['in_chans']} input {m['input_size']}px ({m['intensity']})\n"
            f"  training:  {m['objective']}, {m['rounds']} rounds, {m['sites']} sites, "
            f"{m.get('examples_seen', '?')} examples seen\n"
            f"  privacy:   DP {p.get('differential_privacy')} (epsilon {p.get('epsilon')}, delta {p.get('delta')}), "
            f"secure aggregation {'on' if p.get('secure_aggregation') else 'off'}\n"
            f"  release:   {release}, created {m['created']}\n"
            f"  fedrad:    {m.get('fedrad_version')}")


def _card_line(manifest: dict[str, Any]) -> str:
    card = manifest.get("card")
    if not card:
        return f"no {CARD} in this bundle's manifest"
    return f"{CARD} sha256 {card['sha256']} matches the manifest"


def _config_line(manifest: dict[str, Any]) -> str:
    entry = manifest.get("config")
    if not entry:
        return f"no {CONFIG} in this bundle's manifest"
    if entry.get("file") is None:
        return f"no {CONFIG}: {entry.get('reason')}"
    return f"{CONFIG} sha256 {entry['sha256']} matches the manifest (timm: local-dir:BUNDLE)"



__all__ = ["BUNDLE_FORMAT", "BundleVerificationError", "CARD", "CONFIG", "INTENSITY", "MANIFEST", "ReleasePolicy",
           "SIGNATURE", "VerifiedBundle", "WEIGHTS", "build_backbone", "check_manifest", "describe",
           "load_verified_backbone", "manifest_bytes", "parse_weights",
           "read_manifest_unverified", "read_verified", "sha256_bytes", "verify_bundle"]
