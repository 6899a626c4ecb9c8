"""What the consortium signs for a run, as both the operator and every site compute it.

A signed run is the pair (FAB bytes, fused run-config): the sha256 of the FAB the coordinator hands to the
sites and every run-config value the sites will receive (the FAB's own defaults fused with the operator's
overrides, exactly as the SuperNode fuses them). The operator signs `run_statement(...)` with the consortium
Ed25519 key and sends the signature as the run-config value `run-signature`; the site recomputes the same
statement from what it received and checks it against `consortium.pub` before any of its data is touched.
A coordinator that changes one byte of the FAB or one config value (model, dp, label fields...) breaks it.

The statement also carries `RunClaims`: a nonce (each site binds it to the first Flower run id that uses it
and refuses it under any other, so a signed run cannot be started again), a not-after time, and the message
types the run may send; the site also refuses a `server-round` above the signed `num-server-rounds`.

The not-after time bounds when the run may START, not how long it may last: a site refuses to start (bind the
nonce of) a run whose statement has expired, but a run it accepted before then is served to its last signed
round, however many weeks that takes (`expiry_problem`; the site's side is client/site/site_state.bind_nonce).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

SIGNATURE_KEY = "run-signature"  # run-config key; its own value is left out of what is signed
STATEMENT_VERSION = 2  # 2: + nonce, not-after, message types (a version-1 signature is refused as replayable)
DEFAULT_VALID_SECONDS = 7 * 86_400  # `fedrad run --sign-key`: a signed run must start within a week unless told
# The message types a run may send (Flower's MessageType.TRAIN/EVALUATE, fedrad.common.release_wire's queries).
TRAINING_MESSAGES = ("train", "evaluate")
RELEASE_MESSAGES = ("query.release_offer", "query.release_files")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
MAX_CLAIMS_BYTES = 1024


@dataclass(frozen=True)
class RunClaims:
    """What the signature binds besides the FAB and the config: the run may be started once (`nonce`, bound by
    each site to the first Flower run id that uses it), no later than `not_after` (unix seconds; a run started
    in time goes on after it), sending only `message_types`. The round bound is the signed config's own
    `num-server-rounds`."""

    nonce: str
    not_after: int
    message_types: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "not_after": int(self.not_after), "message_types": list(self.message_types)}

    @classmethod
    def from_json(cls, data: Any) -> RunClaims | None:
        """The claims, or None when `data` is not exactly a well-formed claims object."""
        if not isinstance(data, dict) or set(data) != {"nonce", "not_after", "message_types"}:
            return None
        nonce, not_after, types = data["nonce"], data["not_after"], data["message_types"]
        if not isinstance(nonce, str) or not _NONCE.match(nonce):
            return None
        if isinstance(not_after, bool) or not isinstance(not_after, int) or not_after <= 0:
            return None
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in types):
            return None
        return cls(nonce, not_after, tuple(types))


def run_message_types(run_config: dict[str, Any]) -> tuple[str, ...]:
    """The message types a run of this config sends: training and evaluation, plus the release queries when it
    publishes (`publish-dir`); a `publish-only` run sends only those."""
    def on(key: str) -> bool:
        value = run_config.get(key, False)
        return value if isinstance(value, bool) else str(value).lower() == "true"

    types = () if on("publish-only") else TRAINING_MESSAGES
    return types + (RELEASE_MESSAGES if str(run_config.get("publish-dir") or "") else ())


def new_claims(run_config: dict[str, Any], valid_seconds: float = DEFAULT_VALID_SECONDS,
               now: float | None = None) -> RunClaims:
    """Fresh claims for signing a run: a random nonce, not-after `valid_seconds` from now."""
    if not valid_seconds > 0:
        raise ValueError(f"a signed run's validity must be > 0 seconds, got {valid_seconds!r}")
    now = time.time() if now is None else now
    return RunClaims(secrets.token_hex(16), int(now + valid_seconds), run_message_types(run_config))


def fused_run_config(fab_bytes: bytes, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run-config a SuperNode builds for a run: the FAB's `[tool.flwr.app.config]` fused with `overrides`.

    Flower's own functions, so the operator's copy and the site's copy cannot drift apart.
    """
    from flwr.common.config import flatten_dict, fuse_dicts, get_fab_config

    defaults = get_fab_config(fab_bytes)["tool"]["flwr"]["app"].get("config", {})
    return fuse_dicts(flatten_dict(defaults), dict(overrides))


def run_statement(fab_sha256: str, run_config: dict[str, Any], claims: RunClaims) -> bytes:
    """Canonical bytes that the consortium signs: FAB hash + every run-config value except the signature +
    the claims (nonce, not-after, message types)."""
    config = {k: v for k, v in run_config.items() if k != SIGNATURE_KEY}
    body = {"fedrad-run-statement": STATEMENT_VERSION, "fab_sha256": fab_sha256, "run_config": config,
            **claims.to_json()}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def format_signature(signer_fingerprint: str, claims: RunClaims, signature: bytes) -> str:
    """`<signer fingerprint hex>:<base64 claims JSON>:<base64 Ed25519 signature>`, run-config `run-signature`."""
    body = json.dumps(claims.to_json(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    b64_claims, b64_signature = base64.b64encode(body).decode("ascii"), base64.b64encode(signature).decode("ascii")
    return f"{signer_fingerprint}:{b64_claims}:{b64_signature}"


def parse_signature(value: object) -> tuple[str, RunClaims, bytes] | None:
    """(signer fingerprint, claims, signature bytes), or None when `value` is not a well-formed signature
    (a version-1 signature, without claims, is not one)."""
    if not isinstance(value, str) or value.count(":") != 2 or len(value) > 4 * MAX_CLAIMS_BYTES:
        return None
    fingerprint, b64_claims, b64 = value.split(":")
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        return None
    try:
        signature = base64.b64decode(b64, validate=True)
        claims = RunClaims.from_json(json.loads(base64.b64decode(b64_claims, validate=True)))
    except (binascii.Error, ValueError):
        return None
    return (fingerprint, claims, signature) if claims is not None and len(signature) == 64 else None


EXPIRY_RULE = "run_expiry"


def expiry_problem(claims: RunClaims, now: float | None = None) -> tuple[str, str] | None:
    """(rule, why) when a run under these claims may no longer START (now is past its not-after), else None.

    Only a run's start is bounded: the site asks this when it first sees the run (its nonce is not yet bound
    to a Flower run id, client/site/site_state.bind_nonce); a run it accepted before the not-after keeps running
    to its signed num-server-rounds, so a weeks-long run is not cut off mid-way by its statement's expiry."""
    now = time.time() if now is None else now
    if now <= claims.not_after:
        return None
    expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.not_after))
    return EXPIRY_RULE, (f"the signed run had to start by {expired} and did not start here before then "
                         "(sign it afresh to run it)")


def claims_problem(claims: RunClaims, run_config: dict[str, Any], message_type: str,
                   server_round: int | None) -> tuple[str, str] | None:
    """(rule, why) a message may not run under these (verified) claims, or None. Rules: "run_message_types",
    "run_rounds". The nonce and the start deadline are the site's to check when it binds the nonce (rules
    "run_nonce", "run_expiry": `expiry_problem`), since only a run's start is bounded in time."""
    if message_type not in claims.message_types:
        return "run_message_types", (f"message type {message_type[:64]!r} is not one the signed run may send "
                                     f"({list(claims.message_types)})")
    if server_round is not None:
        try:
            rounds = int(run_config.get("num-server-rounds", 0))
        except (TypeError, ValueError):
            rounds = 0
        if server_round > rounds:
            return "run_rounds", f"server-round {server_round} exceeds the signed num-server-rounds {rounds}"
    return None


def statement_key(run_config: dict[str, Any]) -> str:
    """A key naming the run as the consortium signed it (the hash of its signature, which covers the nonce),
    for the site's ledger; for an unsigned run (--allow-unsigned), the hash of its config."""
    signed = run_config.get(SIGNATURE_KEY) or ""
    if signed:
        return "signed:" + sha256_hex(str(signed).encode("utf-8"))[:32]
    body = json.dumps(run_config, sort_keys=True, default=repr).encode("utf-8")
    return "unsigned:" + sha256_hex(body)[:32]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
