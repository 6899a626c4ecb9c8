"""Fuzz target (atheris): bundle verification on mutated manifests, signatures and weights.

The contract under test (`fedrad.common.bundle.verify_bundle`): every input ends in the manifest of a
bundle whose weights match it, or in BundleVerificationError (refused, exit 1), FileNotFoundError or
ValueError (bad input, exit 2). Any other exception is a crash. Most mutations are re-signed with the
harness's own key, so the checks after the signature (manifest shape, release policy, weights hash and
format) are reached, as they would be for a buggy or misused signer.

Bounded run (what tests/test_release.py runs, ~10 s):
    .venv/bin/python tests/fuzz/fuzz_bundle.py -runs=4000 -max_total_time=25 -seed=1
Longer campaign (keeps its corpus; a crash is written as crash-<sha1> in the current folder):
    mkdir -p /tmp/bundle-corpus && .venv/bin/python tests/fuzz/fuzz_bundle.py -max_total_time=3600 /tmp/bundle-corpus
Replay one input: .venv/bin/python tests/fuzz/fuzz_bundle.py crash-<sha1>
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["fedrad.common.bundle", "fedrad.common.keys"]):
    from fedrad.common.bundle import (
        BUNDLE_FORMAT,
        MANIFEST,
        SIGNATURE,
        WEIGHTS,
        BundleVerificationError,
        ReleasePolicy,
        manifest_bytes,
        verify_bundle,
    )

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: runs are reproducible
PUBLIC = KEY.public_key()
WEIGHT_BYTES = save({"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                     "fc.bias": np.zeros(3, dtype=np.float32)}, metadata={"model": "test_resnet"})
# In memory where the system has it (the three files are rewritten for every input), or FUZZ_BUNDLE_DIR.
# libFuzzer ends the process without Python's atexit when it stops on -runs/-max_total_time, so a caller
# that wants no leftovers passes its own (temporary) FUZZ_BUNDLE_DIR.
_ROOT = os.environ.get("FUZZ_BUNDLE_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
BUNDLE = Path(tempfile.mkdtemp(prefix="fuzz-bundle-", dir=_ROOT)) / "bundle"
BUNDLE.mkdir()
atexit.register(shutil.rmtree, BUNDLE.parent, True)


def valid_manifest(weights: bytes = WEIGHT_BYTES) -> dict:
    return {"format": BUNDLE_FORMAT, "model": "test_resnet", "in_chans": 1, "input_size": 32,
            "intensity": "[0,1] grayscale, zero-padded square", "objective": "simclr", "norm": "batch",
            "rounds": 2, "sites": 3, "site_images": 60, "examples_seen": 144, "strategy": "fedavg",
            "privacy": {"differential_privacy": "none"}, "fedrad_version": "0.1.0",
            "created": "2026-01-31T12:00:00Z",
            "release": {"run_id": "1", "run_key": "abc", "sequence": 2},
            "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
            "signer": {"algorithm": "Ed25519", "public_key_sha256": "0" * 64}}


def json_value(fdp: atheris.FuzzedDataProvider):
    """A JSON value of any type, including the awkward ones (huge ints, nan, deep nesting)."""
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 40))
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.PickValueInList([float("nan"), float("inf"), -1, 0, 2**70])
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind == 6:
        return [json_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7:
        return {fdp.ConsumeUnicodeNoSurrogates(8): json_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if kind == 8:
        return "2026-" + fdp.ConsumeUnicodeNoSurrogates(16)
    return "f" * 64


def mutate(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, bytes, bytes]:
    """(manifest, signature, weights) of one mutated bundle."""
    weights = WEIGHT_BYTES
    manifest = valid_manifest()
    body: bytes | None = None
    sign = True
    mode = fdp.ConsumeIntInRange(0, 6)
    if mode == 0:  # arbitrary signed bytes as the manifest
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    elif mode == 1:  # one field (top level, weights.*, release.*) set to any JSON value, signed
        where = fdp.PickValueInList([manifest, manifest["weights"], manifest["release"]])
        name = fdp.PickValueInList(sorted(where) + ["extra"])
        if fdp.ConsumeBool():
            where[name] = json_value(fdp)
        else:
            where.pop(name, None)
    elif mode == 2:  # manifest bytes flipped after signing
        body = bytearray(manifest_bytes(manifest))
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            body[fdp.ConsumeIntInRange(0, len(body) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
        body, sign = bytes(body), False
    elif mode == 3:  # garbage weights that the (re-)signed manifest vouches for
        weights = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        manifest = valid_manifest(weights)
    elif mode == 4:  # weights changed after signing
        weights = bytearray(WEIGHT_BYTES)
        weights[fdp.ConsumeIntInRange(0, len(weights) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
        weights = bytes(weights) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
    elif mode == 5:  # a whole JSON document of any shape, signed
        body = json.dumps(json_value(fdp)).encode()
    if body is None:
        body = manifest_bytes(manifest)
    sig = KEY.sign(body) if sign else b""
    if mode == 6:  # the signature itself mutated
        sig = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    return body, sig, weights


def policy(fdp: atheris.FuzzedDataProvider) -> ReleasePolicy | None:
    if not fdp.ConsumeBool():
        return None
    return ReleasePolicy.from_args(fdp.PickValueInList([None, "1", "abc", "x"]),
                                   fdp.PickValueInList([None, 1, 2, 3]),
                                   fdp.PickValueInList([None, "2026-01-31", "2027-01-01T00:00:00Z"]))


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    body, sig, weights = mutate(fdp)
    (BUNDLE / MANIFEST).write_bytes(body)
    (BUNDLE / SIGNATURE).write_bytes(sig)
    (BUNDLE / WEIGHTS).write_bytes(weights)
    try:
        manifest = verify_bundle(BUNDLE, PUBLIC, policy(fdp))
    except (BundleVerificationError, FileNotFoundError, ValueError):
        return
    # Accepted: then the weights on disk are exactly the ones the signed manifest names.
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert KEY.public_key().verify(sig, body) is None


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
