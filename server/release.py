"""Signed foundation-weights bundles: what the consortium hands to sites, and how a site checks it.

A bundle is a folder with three files:

* `weights.safetensors`: the backbone's state_dict only, under timm's key names, so
  `timm.create_model(manifest["model"], in_chans=1, num_classes=0).load_state_dict(load_file(...))` works
  without fedrad;
* `manifest.json`: how the weights were made and how to feed them (model, input size, intensity scaling,
  objective, rounds, sites, privacy settings, fedrad version) plus the sha256 of the weights file;
* `manifest.sig`: the raw 64-byte Ed25519 signature over the exact bytes of manifest.json. It also checks
  with plain OpenSSL: `openssl pkeyutl -verify -pubin -inkey K.pub -rawin -in manifest.json -sigfile manifest.sig`.

Signing the manifest (not the weights) keeps the signature small and the hash binds the weights to it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrad.common.atomic import atomic_write_bytes
from fedrad.server.run_log import read_metrics

if TYPE_CHECKING:
    from torch import nn

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BUNDLE_FORMAT = "fedrad-bundle/1"
INTENSITY = "[0,1] grayscale, zero-padded square"


class BundleVerificationError(Exception):
    """A bundle failed a check; the message names the check and the file."""


# -- keys -----------------------------------------------------------------------------------------
def _key_paths(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")


def generate_keys(prefix: str | os.PathLike[str], overwrite: bool = True) -> tuple[Path, Path]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600, atomic) and PREFIX.pub (SubjectPublicKeyInfo PEM).

    The private key file is created 0600 before any key byte is written, so it is never readable by others.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path, pub_path = _key_paths(Path(prefix))
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise FileExistsError(f"{key_path} or {pub_path} already exists; refusing to overwrite a signing key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(key_path, pem, mode=0o600)
    atomic_write_bytes(pub_path, pub, mode=0o644)
    return key_path, pub_path


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not Path(path).is_file():
        raise FileNotFoundError(f"signing key not found: {path}")
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (make one with `fedrad keys generate`)")
    return key


def _load_public(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not Path(path).is_file():
        raise BundleVerificationError(f"missing file: public key {path} not found")
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as exc:
        raise BundleVerificationError(f"public key {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleVerificationError(f"public key {path} is not an Ed25519 key")
    return key


def key_fingerprint(public_key) -> str:
    """sha256 of the raw 32-byte public key (hex): names the signer in the manifest and in messages."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- release --------------------------------------------------------------------------------------
def _fedrad_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedrad")
    except PackageNotFoundError:
        return "unknown"


def _privacy(config: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The run's privacy guarantees as a site would want to read them (ε/δ or 'none'), with the mechanism,
    its unit (site or image) and whether it is a formal guarantee, from summary.json when the run wrote it."""
    dp = str(config.get("dp", "none") or "none")
    eps = [r["dp_epsilon"] for r in rows if r.get("dp_epsilon") is not None]
    out: dict[str, Any] = {
        "differential_privacy": dp,
        "secure_aggregation": bool(config.get("secagg", False)),
    }
    if dp == "none":
        out.update({"epsilon": "none", "delta": "none"})
    else:
        out.update({"epsilon": float(eps[-1]) if eps else "not reported",
                    "delta": float(config.get("dp-delta", 1e-5)),
                    "clip": config.get("dp-clip"), "noise_multiplier": config.get("dp-noise")})
    written = (summary or {}).get("privacy") or {}
    for key in ("mechanism", "unit", "formal_guarantee", "statement", "accountant", "site_epsilons", "sites",
                "rounds"):
        if key in written:
            out[key] = written[key]
    return out


def build_manifest(run_dir: Path, weights: Path, signer_fingerprint: str) -> dict[str, Any]:
    """Collect the manifest from the run directory (global.safetensors metadata, run.json, metrics.jsonl)."""
    from fedrad.common.models import read_metadata

    meta = read_metadata(weights)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    config: dict[str, Any] = dict(run.get("config", {}))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    rows = read_metrics(run_dir)
    model = meta.get("model") or config.get("model")
    if not model:
        raise ValueError(f"{weights}: metadata names no model and {run_dir / 'run.json'} has none")
    size = meta.get("image_size") or config.get("image-size")
    batch = int(config.get("batch-size", 0) or 0)
    # Per site and round: its reported examples_seen, else steps x batch size. (A round's top-level
    # metrics are the strategy's weighted *averages* over sites, so they are not summed here.)
    seen = 0
    for r in rows:
        for s in (r.get("sites") or {}).values():
            seen += int(s["examples_seen"]) if "examples_seen" in s else int(s.get("steps", 0)) * batch
    site_images = 0
    if rows:
        site_images = int(sum(float(s.get("num-examples", 0)) for s in (rows[-1].get("sites") or {}).values()))
    return {
        "format": BUNDLE_FORMAT,
        "model": model,
        "in_chans": int(meta.get("in_chans", 1)),
        "input_size": int(size) if size else None,
        "intensity": INTENSITY,
        "objective": meta.get("objective") or config.get("objective"),
        "norm": meta.get("norm", "batch"),
        "rounds": int(meta.get("rounds") or summary.get("rounds") or len(rows)),
        "sites": max((int(r.get("sites_aggregated", 0)) for r in rows), default=0),
        "site_images": site_images,
        "examples_seen": seen,
        "strategy": config.get("strategy"),
        "privacy": _privacy(config, rows, summary),
        "fedrad_version": _fedrad_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
        "signer": {"algorithm": "Ed25519", "public_key_sha256": signer_fingerprint},
        "load_with": _load_with(model, meta.get("norm", "batch")),
    }


def _load_with(model: str, norm: str) -> str:
    """How to load the weights without fedrad's CLI (the GroupNorm variant needs fedrad's converter)."""
    if norm == "group":
        return (f"fedrad.common.models.create_backbone({model!r}, in_chans=1, norm='group').load_state_dict("
                f"safetensors.torch.load_file('{WEIGHTS}'))  # BatchNorm replaced by GroupNorm (dp=sample)")
    return (f"timm.create_model({model!r}, in_chans=1, num_classes=0).load_state_dict("
            f"safetensors.torch.load_file('{WEIGHTS}'))")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def release_bundle(run_dir: str | os.PathLike[str], key_path: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write weights.safetensors, manifest.json and manifest.sig into `out_dir` (default RUN_DIR/release).

    The weights are checked to load strictly into a fresh timm backbone before anything is signed, so a
    consortium never signs a file sites cannot use. Each file is written atomically; the signature last.
    """
    from fedrad.common.models import load_backbone, read_metadata

    run_dir = Path(run_dir)
    src = run_dir / "global.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: is {run_dir} a finished fedrad run directory?")
    key = _load_private(Path(key_path))
    fingerprint = key_fingerprint(key.public_key())
    out = Path(out_dir) if out_dir else run_dir / "release"
    out.mkdir(parents=True, exist_ok=True)
    # Stale signature out of the way first: a crash part-way leaves an unsigned (unverifiable) bundle,
    # never an old signature beside new files.
    (out / SIGNATURE).unlink(missing_ok=True)
    data = src.read_bytes()
    weights = atomic_write_bytes(out / WEIGHTS, data, mode=0o644)
    meta = read_metadata(weights)
    load_backbone(meta.get("model", ""), weights)  # strict load: raises if not a plain backbone
    manifest = build_manifest(run_dir, weights, fingerprint)
    body = manifest_bytes(manifest)
    atomic_write_bytes(out / MANIFEST, body, mode=0o644)
    atomic_write_bytes(out / SIGNATURE, key.sign(body), mode=0o644)
    return out


# -- verify ---------------------------------------------------------------------------------------
def verify_bundle(bundle: str | os.PathLike[str], pub_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check signature (with `pub_path`) then the weights hash; return the manifest or raise with the reason."""
    from cryptography.exceptions import InvalidSignature

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleVerificationError(f"missing file: bundle folder {bundle} not found")
    for name in (MANIFEST, SIGNATURE, WEIGHTS):
        if not (bundle / name).is_file():
            raise BundleVerificationError(f"missing file: {bundle / name}")
    public = _load_public(Path(pub_path))
    body = (bundle / MANIFEST).read_bytes()
    sig = (bundle / SIGNATURE).read_bytes()
    try:
        public.verify(sig, body)
    except InvalidSignature:
        expected = key_fingerprint(public)
        try:
            claimed = json.loads(body)["signer"]["public_key_sha256"]
        except (ValueError, KeyError, TypeError):
            claimed = None
        if claimed and claimed != expected:
            raise BundleVerificationError(
                f"signature invalid: wrong key: {bundle / MANIFEST} was signed by key {claimed[:16]}..., "
                f"not by {pub_path} ({expected[:16]}...)") from None
        raise BundleVerificationError(
            f"signature invalid: {bundle / MANIFEST} or {SIGNATURE} was modified after signing "
            f"(does not verify with {pub_path})") from None
    manifest = json.loads(body)
    want = manifest.get("weights", {}).get("sha256")
    got = sha256_file(bundle / WEIGHTS)
    if want != got:
        raise BundleVerificationError(
            f"weights hash mismatch: {bundle / WEIGHTS} has sha256 {got[:16]}..., the signed manifest says "
            f"{str(want)[:16]}... (file modified or corrupted)")
    return manifest


def read_manifest_unverified(bundle: Path) -> dict[str, Any]:
    """Manifest of a bundle, or one made from a bare .safetensors file's metadata (for --insecure)."""
    from fedrad.common.models import read_metadata

    if bundle.is_file():
        meta = read_metadata(bundle)
        size = meta.get("image_size")
        return {"model": meta.get("model"), "in_chans": int(meta.get("in_chans", 1)),
                "input_size": int(size) if size else None, "intensity": INTENSITY,
                "objective": meta.get("objective"), "norm": meta.get("norm", "batch"),
                "weights": {"file": bundle.name}}
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle}: no {MANIFEST} (not a fedrad bundle)")
    return json.loads(path.read_text())


def load_verified_backbone(bundle: str | os.PathLike[str], pubkey: str | os.PathLike[str] | None,
                           insecure: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone in eval mode, manifest). Verified unless `insecure`; `insecure` also accepts a bare file."""
    from fedrad.common.models import create_backbone
    from safetensors.torch import load_file

    bundle = Path(bundle)
    if insecure:
        print(f"fedrad: WARNING: using {bundle} WITHOUT signature verification (--insecure)", file=sys.stderr)
        manifest = read_manifest_unverified(bundle)
        weights = bundle if bundle.is_file() else bundle / manifest.get("weights", {}).get("file", WEIGHTS)
    else:
        if not pubkey:
            raise BundleVerificationError("no public key given: pass --pubkey (or --insecure to skip the check)")
        manifest = verify_bundle(bundle, pubkey)
        weights = bundle / WEIGHTS
    if not manifest.get("model"):
        raise ValueError(f"{bundle}: the manifest/metadata names no model")
    backbone = create_backbone(manifest["model"], in_chans=int(manifest.get("in_chans", 1)),
                               image_size=manifest.get("input_size"), norm=manifest.get("norm", "batch"))
    backbone.load_state_dict(load_file(os.fspath(weights)), strict=True)
    backbone.eval()
    return backbone, manifest


# -- CLI ------------------------------------------------------------------------------------------
def cmd_keys_generate(args: argparse.Namespace) -> int:
    """`fedrad keys generate`: refuses to overwrite, since losing a signing key orphans released bundles."""
    try:
        key, pub = generate_keys(Path(args.out), overwrite=False)
    except FileExistsError as exc:
        print(f"fedrad keys generate: error: {exc}", file=sys.stderr)
        return 1
    print(f"private key {key} (mode 0600: keep it offline; it signs releases)\npublic key  {pub} "
          f"(give this to every site)")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    out = release_bundle(Path(args.run_dir), Path(args.key), Path(args.out) if args.out else None)
    m = json.loads((out / MANIFEST).read_text())
    print(f"released {out}: {m['model']} {m['input_size']}px, {m['objective']}, {m['rounds']} rounds, "
          f"{m['sites']} sites; weights sha256 {m['weights']['sha256']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        m = verify_bundle(Path(args.bundle), Path(args.pubkey))
    except BundleVerificationError as exc:
        print(f"fedrad verify: FAILED: {exc}", file=sys.stderr)
        return 1
    p = m.get("privacy", {})
    print(f"OK {args.bundle}\n  signature: valid Ed25519 signature by {args.pubkey} over {MANIFEST}\n"
          f"  weights:   {WEIGHTS} sha256 {m['weights']['sha256']} matches the manifest\n"
          f"  model:     {m['model']} in_chans={m['in_chans']} input {m['input_size']}px ({m['intensity']})\n"
          f"  training:  {m['objective']}, {m['rounds']} rounds, {m['sites']} sites, "
          f"{m.get('examples_seen', '?')} examples seen\n"
          f"  privacy:   DP {p.get('differential_privacy')} (epsilon {p.get('epsilon')}, delta {p.get('delta')}), "
          f"secure aggregation {'on' if p.get('secure_aggregation') else 'off'}\n"
          f"  fedrad:    {m.get('fedrad_version')}")
    return 0


def signature_b64(bundle: Path) -> str:
    """The signature as base64 text (for logs and tickets)."""
    return base64.b64encode((Path(bundle) / SIGNATURE).read_bytes()).decode()


__all__ = ["BundleVerificationError", "cmd_keys_generate", "cmd_release", "cmd_verify",
           "generate_keys", "load_verified_backbone", "release_bundle", "verify_bundle"]
