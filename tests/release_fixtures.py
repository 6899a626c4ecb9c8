"""A fake run directory and a signed bundle, without running a federation.

`make_run_dir` mirrors what server/rounds.py writes at the end of a run: `global.safetensors` (the backbone
via common.models.save_backbone, metadata model/in_chans/image_size/objective/rounds), `run.json`
({"config": run-config}), `metrics.jsonl` (one JSON line per round) and `summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL = "test_resnet"
SIZE = 32


def make_run_dir(root: Path, model: str = MODEL, size: int = SIZE, rounds: int = 2, dp: str = "none",
                 seed: int = 0, norm: str = "batch") -> Path:
    import torch

    from fedrad.common.models import build_model, save_backbone

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_ = build_model(model, "simclr", size, proj_dim=32, norm=norm)
    save_backbone(model_.backbone, run / "global.safetensors",
                  {"model": model, "in_chans": "1", "image_size": str(size), "objective": "simclr",
                   "rounds": str(rounds), "norm": norm})
    config = {"model": model, "objective": "simclr", "image-size": size, "num-server-rounds": rounds,
              "batch-size": 8, "local-steps": 3, "secagg": False, "dp": dp, "dp-delta": 1e-5, "strategy": "fedavg"}
    (run / "run.json").write_text(json.dumps({"run_id": 1, "config": config, "started": 0.0, "start_round": 1}))
    lines = []
    for r in range(1, rounds + 1):
        entry = {"round": r, "sites_answered": 3, "sites_aggregated": 3, "train_loss": 3.0 - r * 0.1,
                 "sites": {str(n): {"train_loss": 3.0, "num_examples": 20.0, "steps": 3.0} for n in range(3)}}
        if dp != "none":
            entry["dp_epsilon"] = 0.5 * r
        lines.append(json.dumps(entry))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"rounds": rounds, "finished": 0.0,
                                                  "global_weights": "global.safetensors", "config": config}))
    return run


def make_bundle(root: Path, **kw) -> tuple[Path, Path, Path]:
    """(bundle folder, private key, public key) from a fake run directory."""
    from fedrad.server.release import generate_keys, release_bundle

    run = make_run_dir(root, **kw)
    key, pub = generate_keys(root / "keys" / "consortium")
    return release_bundle(run, key, root / "bundle"), key, pub


def two_releases(root: Path) -> tuple[Path, Path, Path, Path]:
    """(release #1, release #2 of the same run, private key, public key)."""
    from fedrad.server.release import release_bundle

    first, key, pub = make_bundle(root)
    return first, release_bundle(root / "run", key, root / "bundle2"), key, pub


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """A bundle folder's files by name, as a release message carries them."""
    return {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}


def resign(bundle: Path, key: Path, manifest: bytes) -> None:
    """Write `manifest` as the bundle's manifest.json and sign it with `key`: a signed-but-odd bundle."""
    from fedrad.server.release import load_private_key

    (bundle / "manifest.json").write_bytes(manifest)
    (bundle / "manifest.sig").write_bytes(load_private_key(key).sign(manifest))


def set_weights(bundle: Path, key: Path, data: bytes) -> None:
    """Replace the weights and re-sign a manifest whose hash and size match them (the signer vouches)."""
    import hashlib

    from fedrad.common.bundle import manifest_bytes

    (bundle / "weights.safetensors").write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    resign(bundle, key, manifest_bytes(m))


def fedrad_cli(*args: str, timeout: float = 300):
    """The real `fedrad` command in a child process (what a user runs), with its exit code and output."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("fedrad")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "fedrad.deploy.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc) -> str:
    """The stderr of a command that must end bad input with one clear line and no traceback."""
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, err
    return lines[0]
