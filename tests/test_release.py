"""Signed bundles: keys are private, a good bundle verifies, and each kind of tampering fails distinctly."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
from fedrad.common.bundle import BundleVerificationError, load_verified_backbone, verify_bundle
from fedrad.deploy.cli import main
from fedrad.server.release import generate_keys
from release_fixtures import MODEL, SIZE, make_bundle


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("rel"))


@pytest.fixture
def bundle_copy(signed, tmp_path):
    bundle, _key, pub = signed
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst, pub


def test_private_key_is_0600_and_pub_is_pem(tmp_path):
    key, pub = generate_keys(tmp_path / "k" / "site")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not list(key.parent.glob(".*.tmp"))  # no temp files left behind


def test_cli_keys_generate_refuses_overwrite(tmp_path, capsys):
    prefix = tmp_path / "c"
    assert main(["keys", "generate", "--out", str(prefix)]) == 0
    assert stat.S_IMODE((tmp_path / "c.key").stat().st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(prefix)]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err


def test_verify_ok_and_manifest_contents(signed, capsys):
    bundle, _key, pub = signed
    m = verify_bundle(bundle, pub)
    assert m["model"] == MODEL and m["in_chans"] == 1 and m["input_size"] == SIZE
    assert m["intensity"] == "[0,1] grayscale, zero-padded square"
    assert m["rounds"] == 2 and m["sites"] == 3 and m["examples_seen"] == 2 * 3 * 3 * 8
    assert m["privacy"]["epsilon"] == "none" and m["privacy"]["secure_aggregation"] is False
    assert len(m["weights"]["sha256"]) == 64 and m["fedrad_version"]
    assert main(["verify", str(bundle), "--pubkey", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "signature: valid" in out and "matches the manifest" in out


def test_timm_loads_weights_directly(signed):
    import timm
    import torch
    from safetensors.torch import load_file

    bundle, _key, pub = signed
    net = timm.create_model(MODEL, in_chans=1, num_classes=0)
    net.load_state_dict(load_file(bundle / "weights.safetensors"), strict=True)
    backbone, manifest = load_verified_backbone(bundle, pub)
    x = torch.rand(2, 1, SIZE, SIZE)
    net.eval()
    assert torch.allclose(net(x), backbone(x))
    assert manifest["model"] == MODEL


def _fails(bundle, pub, capsys) -> tuple[str, str]:
    with pytest.raises(BundleVerificationError) as exc:
        verify_bundle(bundle, pub)
    assert main(["verify", str(bundle), "--pubkey", str(pub)]) != 0
    return str(exc.value), capsys.readouterr().err


def test_tampered_weight_byte(bundle_copy, capsys):
    bundle, pub = bundle_copy
    w = bundle / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("weights hash mismatch") and "weights hash mismatch" in err


def test_tampered_manifest(bundle_copy, capsys):
    bundle, pub = bundle_copy
    m = json.loads((bundle / "manifest.json").read_text())
    m["rounds"] = 99
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("signature invalid") and "modified after signing" in msg and "modified" in err


def test_wrong_public_key(bundle_copy, tmp_path, capsys):
    bundle, _pub = bundle_copy
    _k, other = generate_keys(tmp_path / "other")
    msg, err = _fails(bundle, other, capsys)
    assert msg.startswith("signature invalid: wrong key") and "wrong key" in err


def test_missing_file(bundle_copy, capsys):
    bundle, pub = bundle_copy
    (bundle / "manifest.sig").unlink()
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("missing file") and "manifest.sig" in err


def test_finetune_refuses_a_tampered_bundle(bundle_copy, tmp_path, capsys):
    bundle, pub = bundle_copy
    (bundle / "weights.safetensors").write_bytes(b"x" + (bundle / "weights.safetensors").read_bytes()[1:])
    code = main(["finetune", str(bundle), "--pubkey", str(pub), "--data", str(tmp_path / "none.npz")])
    assert code == 1 and "verification FAILED" in capsys.readouterr().err


def test_dp_run_reports_epsilon(tmp_path):
    bundle, _k, pub = make_bundle(tmp_path, dp="server-fixed")
    p = verify_bundle(bundle, pub)["privacy"]
    assert p["differential_privacy"] == "server-fixed" and p["epsilon"] == 1.0 and p["delta"] == 1e-5
