"""The operator's side of run signing: the consortium key signs the FAB and run-config a run will carry.

Sites check the signature with `consortium.pub` before touching their data (fedrad.client.runtime.site_runtime); what
is signed is defined once, in fedrad.common.run_signature.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedrad.common.keys import key_fingerprint
from fedrad.common.run_signature import (
    DEFAULT_VALID_SECONDS,
    SIGNATURE_KEY,
    RunClaims,
    format_signature,
    fused_run_config,
    new_claims,
    run_statement,
    sha256_hex,
)


def build_fab(app: str | os.PathLike[str]) -> bytes:
    """The FAB `flwr run APP` submits: Flower's own builder, which is byte-deterministic (fixed dates, sorted)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app))


def load_signing_key(path: str | os.PathLike[str]):
    """The consortium's Ed25519 private key; FileNotFoundError / ValueError name the file."""
    from fedrad.server.release import load_private_key

    return load_private_key(Path(path))


def sign_run(fab_bytes: bytes, overrides: dict[str, Any], key, valid_seconds: float = DEFAULT_VALID_SECONDS,
             claims: RunClaims | None = None) -> str:
    """The `run-signature` value for a run of `fab_bytes` with run-config `overrides` (as Flower parsed them).

    `key` is a private key from `load_signing_key`. The signature carries fresh claims (a nonce, valid for
    `valid_seconds`, the message types this config's run sends) unless `claims` are given (tests)."""
    if SIGNATURE_KEY in overrides:
        raise ValueError(f"run-config '{SIGNATURE_KEY}' is set by the signer, not by an override")
    config = fused_run_config(fab_bytes, overrides)
    claims = claims or new_claims(config, valid_seconds)
    statement = run_statement(sha256_hex(fab_bytes), config, claims)
    return format_signature(key_fingerprint(key.public_key()), claims, key.sign(statement))
