"""fedrad as a package: the public Python API, and a wheel installed into a fresh venv that can `fedrad run`.

The wheel test installs with --no-deps and points the fresh venv at this project venv's site-packages for the
dependencies (a `.pth` path line, which adds the folder but runs none of its .pth hooks, so the editable
checkout of fedrad stays out): seconds instead of a multi-GB torch install, and the code under test is the
wheel's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from release_fixtures import make_bundle

ROOT = Path(__file__).resolve().parents[1]
FLOWER_TOOLS = ("flwr", "flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp",
                "flower-superexec")


def test_import_is_cheap_and_public_names_exist():
    code = ("import sys, fedrad; print(fedrad.__version__); "
            "print(sorted(m for m in ('torch', 'flwr', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    from importlib.metadata import version

    assert out[0] == version("fedrad") and out[1] == "[]"
    import fedrad

    for name in ("load_backbone", "verify_bundle", "pretrain", "finetune", "embed"):
        assert callable(getattr(fedrad, name)) and getattr(fedrad, name).__doc__


def test_api_verifies_loads_and_embeds(tmp_path):
    import torch

    import fedrad
    from fedrad.common.bundle import BundleVerificationError
    from fedrad.deploy.synthetic import write_synthetic_sites

    bundle, _key, pub = make_bundle(tmp_path)
    assert fedrad.verify_bundle(bundle, pub)["rounds"] == 2
    backbone, manifest = fedrad.load_backbone(bundle, pub)
    with torch.no_grad():
        feats = backbone(torch.zeros(2, 1, manifest["input_size"], manifest["input_size"]))
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()

    site = write_synthetic_sites(tmp_path / "s", n_sites=1, patients_per_site=6, images_per_patient=(1, 2),
                                 size=48, seed=3)[0]
    out = fedrad.embed(bundle, site, tmp_path / "emb", pubkey=pub)
    assert np.load(out / "embeddings.npy").shape[0] >= 6

    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text().replace('"rounds": 2', '"rounds": 3'))
    with pytest.raises(BundleVerificationError):
        fedrad.verify_bundle(bundle, pub)
    with pytest.raises(fedrad.FedradError) as failed:
        fedrad.embed(bundle, site, tmp_path / "emb2", pubkey=pub)
    assert failed.value.exit_code == 1


def _installed_venv(tmp: Path) -> Path:
    """A fresh venv holding only the freshly built wheel, with this venv's packages as its dependencies."""
    wheels, venv = tmp / "wheels", tmp / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, cwd=tmp)
    (wheel,) = wheels.glob("fedrad-*.whl")
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "-q", "--python", str(venv / "bin/python"), "install",
                    "--no-deps", str(wheel)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", purelib], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    for name in FLOWER_TOOLS:  # Flower's console scripts, run by the fresh venv's Python
        source = Path(sys.executable).parent / name
        if source.exists():
            body = source.read_text().split("\n", 1)[1]
            (venv / "bin" / name).write_text(f"#!{venv / 'bin/python'}\n{body}")
            (venv / "bin" / name).chmod(0o755)
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_without_checkout(tmp_path):
    venv = _installed_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = subprocess.run([str(venv / "bin/fedrad"), "--version"], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == "fedrad 0.1.0", version.stderr

    probe = r"""
import hashlib, json, sys, tomllib
import fedrad
from fedrad.deploy.processes import app_dir
from fedrad.deploy.run_command import validate_run_config
from fedrad.server.run_signing import build_fab
app = app_dir()
try:
    validate_run_config({"strategy": "nope"})
    refused = ""
except ValueError as exc:
    refused = str(exc)
validate_run_config({"num-server-rounds": 2, "model": "resnet18"})
fab = build_fab(app)
print(json.dumps({"api": fedrad.__file__, "app": str(app), "refused": refused,
                  "config": tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"],
                  "fab": hashlib.sha256(fab).hexdigest(), "readme": (app / "README.md").exists(),
                  "sources": sorted(str(p.relative_to(app)) for p in app.rglob("*.py"))}))
"""
    runs = [subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["api"].startswith(str(venv)), "the wheel's fedrad, not the checkout's"
    assert not first["app"].startswith(str(ROOT)) and first["readme"]
    assert "strategy" in first["refused"]
    import tomllib

    assert first["config"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert {"common/run_config.py", "client/app/client_app.py", "server/server_app.py"} <= set(first["sources"])
    assert first["fab"] == second["fab"], "the FAB an installed fedrad signs must be byte-deterministic"
