"""Signing a foundation-weights bundle: the consortium's keys, the manifest of a run, and the release.

What a bundle contains and how anyone checks it is `fedrad.common.bundle` (the verifying half, shared with
the sites). Signing the manifest (not the weights) keeps the signature small; the hash in the manifest
binds the weights to it. Every release of a run directory gets the next sequence number, recorded in
RUN_DIR/releases.jsonl before anything is signed, so numbers only grow (a crashed release skips one).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedrad.common.atomic import atomic_write_bytes
from fedrad.common.bundle import (
    BUNDLE_FORMAT,
    CARD,
    CREATED_FORMAT,
    INTENSITY,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    manifest_bytes,
    parse_weights,
    read_verified,
    sha256_bytes,
)
from fedrad.common.keys import key_fingerprint
from fedrad.common.timm_config import CONFIG, config_bytes
from fedrad.server.model_card import model_card, read_finetune_results
from fedrad.server.run_log import read_metrics

RELEASES = "releases.jsonl"
DEFAULT_LICENSE = "apache-2.0"  # the weights' licence (SPDX-style id, as Hugging Face cards take it): `--license`


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


def load_private_key(path: str | os.PathLike[str]):
    """The Ed25519 signing key in PEM file `path`; ValueError/FileNotFoundError (exit 2) naming the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"signing key not found: {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key this version understands "
                         f"({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (make one with `fedrad keys generate`)")
    return key


# -- manifest -------------------------------------------------------------------------------------
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


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    """A run directory's JSON file as a dict; ValueError/FileNotFoundError naming it (exit 2)."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found: is {path.parent} a fedrad run directory?")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header; ValueError naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({str(exc)[:200]})") from None


def next_sequence(run_dir: Path) -> int:
    """1 + the highest release sequence recorded in RUN_DIR/releases.jsonl (1 for a first release)."""
    path = run_dir / RELEASES
    if not path.is_file():
        return 1
    last = 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            last = max(last, int(json.loads(line)["sequence"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a release record (fix or remove the line)") from None
    return last + 1


def _record_release(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / RELEASES
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))


def build_manifest(run_dir: Path, weights: bytes, meta: dict[str, str], signer_fingerprint: str,
                   sequence: int, license_id: str = DEFAULT_LICENSE) -> dict[str, Any]:
    """The manifest of `weights` (bytes of global.safetensors, `meta` its header metadata) from the run
    directory's run.json, summary.json and metrics.jsonl, as release #`sequence` of the run."""
    run = _read_json(run_dir / "run.json", required=True)
    if run.get("run_id") is None:
        raise ValueError(f"{run_dir / 'run.json'}: no run_id (not written by a fedrad run)")
    config: dict[str, Any] = dict(run.get("config") or {})
    summary = _read_json(run_dir / "summary.json", required=False)
    rows = read_metrics(run_dir)
    model = meta.get("model") or config.get("model")
    if not model:
        raise ValueError(f"{run_dir / 'global.safetensors'}: metadata names no model and "
                         f"{run_dir / 'run.json'} has none")
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
        site_images = int(sum(float(s.get("num_examples", 0)) for s in (rows[-1].get("sites") or {}).values()))
    norm = meta.get("norm", "batch")
    return {
        "format": BUNDLE_FORMAT,
        "model": model,
        "in_chans": int(meta.get("in_chans", 1)),
        "input_size": int(size) if size else None,
        "intensity": INTENSITY,
        "objective": meta.get("objective") or config.get("objective"),
        "norm": norm,
        "rounds": int(meta.get("rounds") or summary.get("rounds") or len(rows)),
        "sites": max((int(r.get("sites_aggregated", 0)) for r in rows), default=0),
        "site_images": site_images,
        "examples_seen": seen,
        "strategy": config.get("strategy"),
        "privacy": _privacy(config, rows, summary),
        "fedrad_version": _fedrad_version(),
        "created": time.strftime(CREATED_FORMAT, time.gmtime()),
        "release": {"run_id": str(run["run_id"]), "run_key": run.get("run_key"), "sequence": int(sequence)},
        "init": run.get("init"),  # what the run started from (a checkpoint's sha256, or an earlier release)
        "weights": {"file": WEIGHTS, "sha256": sha256_bytes(weights), "bytes": len(weights)},
        "signer": {"algorithm": "Ed25519", "public_key_sha256": signer_fingerprint},
        "license": license_id,
        "load_with": _load_with(model, norm),
    }


def _load_with(model: str, norm: str, timm_config: bool = False) -> str:
    """How to load the weights without fedrad's CLI (the GroupNorm variant needs fedrad's converter unless the
    bundle's config.json rebuilds it in timm)."""
    if timm_config:
        return ('timm.create_model("local-dir:BUNDLE", pretrained=True)  # config.json + weights.safetensors; '
                'timm.data.resolve_data_config(model=model) gives the preprocessing')
    if norm == "group":
        return (f"fedrad.common.models.create_backbone({model!r}, in_chans=1, norm='group').load_state_dict("
                f"safetensors.torch.load_file('{WEIGHTS}'))  # BatchNorm replaced by GroupNorm (dp=sample)")
    return (f"timm.create_model({model!r}, in_chans=1, num_classes=0).load_state_dict("
            f"safetensors.torch.load_file('{WEIGHTS}'))")


def _check_loads(data: bytes, meta: dict[str, str], where: Path) -> None:
    """The weights parse and load strictly into a fresh backbone of the model they name (ValueError if not)."""
    from fedrad.common.models import create_backbone

    state = parse_weights(data, where)
    model = meta.get("model", "")
    size = meta.get("image_size")
    try:
        backbone = create_backbone(model, in_chans=int(meta.get("in_chans", 1)), image_size=int(size) if size
                                   else None, norm=meta.get("norm", "batch"))
        backbone.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{where}: not a plain {model or '(unnamed)'} backbone ({first})") from None


def _timm_config(out: Path, data: bytes, meta: dict[str, str], manifest: dict[str, Any]) -> None:
    """Write the bundle's timm config.json (common.timm_config) and list it in the manifest, or record why
    timm cannot rebuild this backbone; a config.json left by an earlier release is removed either way first."""
    (out / CONFIG).unlink(missing_ok=True)
    size = manifest["input_size"] or int(meta.get("image_size") or 0)
    if not size:
        manifest["config"] = {"file": None, "reason": "the weights record no input size"}
        return
    rel = manifest["release"]
    body, reason = config_bytes(manifest["model"], manifest["in_chans"], size, manifest["norm"],
                                parse_weights(data, out), f"fedrad-run{rel['run_id']}-release{rel['sequence']}",
                                manifest["license"])
    if body is None:
        manifest["config"] = {"file": None, "reason": reason}
        return
    atomic_write_bytes(out / CONFIG, body, mode=0o644)
    manifest["config"] = {"file": CONFIG, "sha256": sha256_bytes(body), "bytes": len(body)}
    manifest["load_with"] = _load_with(manifest["model"], manifest["norm"], timm_config=True)


def release_bundle(run_dir: str | os.PathLike[str], key_path: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str] | None = None,
                   finetune_results: str | os.PathLike[str] | None = None,
                   license_id: str = DEFAULT_LICENSE) -> Path:
    """Write weights.safetensors, config.json (timm), MODEL_CARD.md, manifest.json and manifest.sig into
    `out_dir` (default RUN_DIR/release); `finetune_results`: a `fedrad finetune` results.json whose AUCs the
    card shows; `license_id`: the weights' licence, as the card and config.json state it.

    global.safetensors is read once; those bytes are checked to load strictly into a fresh backbone before
    anything is signed (a consortium never signs a file sites cannot use), hashed, and written. The card is
    made from the manifest and hashed into it. Each file is written atomically, the signature last; the
    finished bundle is then verified as a site would.
    """
    run_dir = Path(run_dir)
    src = run_dir / "global.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: is {run_dir} a finished fedrad run directory?")
    key = load_private_key(key_path)
    results = read_finetune_results(Path(finetune_results)) if finetune_results else None
    fingerprint = key_fingerprint(key.public_key())
    data = src.read_bytes()
    parse_weights(data, src)  # a corrupt file is a one-line error before anything is written
    out = Path(out_dir) if out_dir else run_dir / "release"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # Stale signature out of the way first: a crash part-way leaves an unsigned (unverifiable) bundle,
    # never an old signature beside new files.
    (out / SIGNATURE).unlink(missing_ok=True)
    # The metadata is read from the copy just written, so it comes from the same bytes that are signed.
    meta = read_weights_metadata(atomic_write_bytes(out / WEIGHTS, data, mode=0o644))
    _check_loads(data, meta, src)
    sequence = next_sequence(run_dir)
    manifest = build_manifest(run_dir, data, meta, fingerprint, sequence, license_id)
    _timm_config(out, data, meta, manifest)
    card = model_card(manifest, _read_json(run_dir / "run.json", required=True),
                      _read_json(run_dir / "summary.json", required=False), read_metrics(run_dir),
                      results).encode("utf-8")
    atomic_write_bytes(out / CARD, card, mode=0o644)
    manifest["card"] = {"file": CARD, "sha256": sha256_bytes(card), "bytes": len(card)}
    body = manifest_bytes(manifest)
    atomic_write_bytes(out / MANIFEST, body, mode=0o644)
    _record_release(run_dir, {"sequence": sequence, "created": manifest["created"], "bundle": str(out),
                              "weights_sha256": manifest["weights"]["sha256"]})
    atomic_write_bytes(out / SIGNATURE, key.sign(body), mode=0o644)
    read_verified(out, key.public_key())
    return out


__all__ = ["DEFAULT_LICENSE", "RELEASES", "build_manifest", "generate_keys",
           "load_private_key", "next_sequence", "release_bundle"]
