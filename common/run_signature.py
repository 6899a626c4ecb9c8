"""What the consortium signs for a run, as both the operator and every site compute it.

A signed run is the pair (FAB bytes, fused run-config): the sha256 of the FAB the coordinator hands to the
sites and every run-config value the sites will receive (the FAB's own defaults fused with the operator's
overrides, exactly as the SuperNode fuses them). The operator signs `run_statement(...)` with the consortium
Ed25519 key and sends the signature as the run-config value `run-signature`; the site recomputes the same
statement from what it received and checks it against `consortium.pub` before any of its data is touched.
A coordinator that changes one byte of the FAB or one config value (model, dp, label fields...) breaks it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

SIGNATURE_KEY = "run-signature"  # run-config key; its own value is left out of what is signed
STATEMENT_VERSION = 1


def fused_run_config(fab_bytes: bytes, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run-config a SuperNode builds for a run: the FAB's `[tool.flwr.app.config]` fused with `overrides`.

    Flower's own functions, so the operator's copy and the site's copy cannot drift apart.
    """
    from flwr.common.config import flatten_dict, fuse_dicts, get_fab_config

    defaults = get_fab_config(fab_bytes)["tool"]["flwr"]["app"].get("config", {})
    return fuse_dicts(flatten_dict(defaults), dict(overrides))


def run_statement(fab_sha256: str, run_config: dict[str, Any]) -> bytes:
    """Canonical bytes that the consortium signs: FAB hash + every run-config value except the signature."""
    config = {k: v for k, v in run_config.items() if k != SIGNATURE_KEY}
    body = {"fedrad-run-statement": STATEMENT_VERSION, "fab_sha256": fab_sha256, "run_config": config}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def format_signature(signer_fingerprint: str, signature: bytes) -> str:
    """`<signer fingerprint hex>:<base64 Ed25519 signature>`, the value of run-config `run-signature`."""
    return f"{signer_fingerprint}:{base64.b64encode(signature).decode('ascii')}"


def parse_signature(value: object) -> tuple[str, bytes] | None:
    """(signer fingerprint, signature bytes), or None when `value` is not a well-formed signature."""
    if not isinstance(value, str) or value.count(":") != 1:
        return None
    fingerprint, b64 = value.split(":")
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        return None
    try:
        signature = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return (fingerprint, signature) if len(signature) == 64 else None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
