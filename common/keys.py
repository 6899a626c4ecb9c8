"""The consortium's Ed25519 public key, as every party loads it: sites verify runs and releases with it.

Signing (the private half) lives with the operator in `fedrad.server`; this module only reads public keys
and checks signatures, so a site needs nothing above `fedrad.common` to decide what it trusts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class KeyFileError(ValueError):
    """A public key file is missing, unreadable or not an Ed25519 key; the message names the file."""


def load_public_key(path: str | os.PathLike[str]):
    """The Ed25519 public key in PEM file `path`, or KeyFileError naming the file and the problem."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"public key {path} not found")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # not PEM, or a key type (SM2) not known here
        raise KeyFileError(f"public key {path} is not a PEM public key this version understands "
                           f"({type(exc).__name__})") from None
    except OSError as exc:
        raise KeyFileError(f"public key {path} cannot be read ({exc.strerror})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path} is not an Ed25519 key (fedrad keys are made by `fedrad keys generate`)")
    return key


def key_fingerprint(public_key) -> str:
    """sha256 of the raw 32-byte public key (hex): names the signer in manifests, run signatures and messages."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def signature_valid(public_key, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature over exactly `data`."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
