"""Releases in the tools sites already use: plain timm (config.json), Hugging Face cards, MONAI bundles, ONNX,
TorchScript; `fedrad export` verifies first, and finetune/embed take a release, an export or `local-dir:`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from release_fixtures import SIZE, make_bundle, make_run_dir, one_line_error

from fedrad.common.bundle import BundleVerificationError, load_verified_backbone, read_verified
from fedrad.deploy.cli import main

# Runs in a child interpreter that never imports fedrad: what a site with only timm installed does.
PLAIN_TIMM = """
import json, sys
import numpy as np, timm, torch
from timm.data import resolve_data_config
out = {}
for bundle in sys.argv[1:]:
    model = timm.create_model("local-dir:" + bundle, pretrained=True).eval()
    cfg = resolve_data_config(model=model)
    x = torch.rand(3, *cfg["input_size"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        np.save(bundle + "/../plain_timm.npy", model(x).numpy())
    out[bundle] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
assert not [m for m in sys.modules if m.split(".")[0] == "fedrad"], "fedrad was imported"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("exp"))


@pytest.fixture(scope="module")
def exported(signed, tmp_path_factory):
    """The release exported in all three formats through the real command (in-process)."""
    bundle, _key, pub = signed
    root = tmp_path_factory.mktemp("out")
    lines = {}
    for fmt in ("monai-bundle", "onnx", "torchscript"):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["export", "--format", fmt, str(bundle), "--pubkey", str(pub), "--out", str(root / fmt)]) == 0
        lines[fmt] = buf.getvalue()
    return root, lines


def _features(backbone, n: int = 3, seed: int = 7) -> np.ndarray:
    x = torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone(x).numpy()


def test_plain_timm_rebuilds_the_release_and_its_preprocessing(signed, tmp_path):
    """A child process with no fedrad: timm.create_model('local-dir:...') gives exactly fedrad's embeddings and
    resolve_data_config the training pipeline's input (1 x S x S in [0, 1], bilinear, zero-padded square).
    The GroupNorm variant (dp = sample) of resnet18 rebuilds through norm_layer='groupnorm' as well."""
    bundle, _key, pub = signed
    gn_bundle, _gn_key, gn_pub = make_bundle(tmp_path / "gn", model="resnet18", norm="group")
    assert json.loads((gn_bundle / "config.json").read_text())["model_args"]["norm_layer"] == "groupnorm"
    proc = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(bundle), str(gn_bundle)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfgs = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, key in ((bundle, pub), (gn_bundle, gn_pub)):
        cfg = cfgs[str(path)]
        assert cfg["input_size"] == [1, SIZE, SIZE] and cfg["mean"] == [0.0] and cfg["std"] == [1.0]
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "border"
        backbone, _ = load_verified_backbone(path, key)
        np.testing.assert_array_equal(np.load(path.parent / "plain_timm.npy"), _features(backbone))


def test_timm_transform_from_the_config_is_fedrads_reading(signed, tmp_path):
    """timm.data.create_transform(**resolve_data_config(model)) on an 8-bit image gives what fedrad's image reader
    gives (the same zero padding; resampling differs by at most a few 1/1000)."""
    import timm
    from PIL import Image

    from fedrad.common.sources.image_folder import image_entry

    bundle, _key, _pub = signed
    model = timm.create_model(f"local-dir:{bundle}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    yy, xx = np.mgrid[0:300, 0:500]
    Image.fromarray((127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)).astype(np.uint8)).save(tmp_path / "g.png")
    theirs = transform(Image.open(tmp_path / "g.png"))[0].numpy()
    ours, _ = image_entry(str(tmp_path / "g.png"), SIZE)
    assert theirs.shape == ours.shape and np.array_equal(theirs == 0, ours == 0)
    assert float(np.abs(theirs - ours).max()) < 0.02


def test_groupnorm_release_timm_cannot_rebuild_says_why(tmp_path):
    """test_resnet's 48-channel layers get 16 GroupNorm groups in fedrad, 32 in timm: no config.json, and the
    manifest, `verify` and the card say why; a config.json dropped in beside it is refused as unsigned."""
    bundle, _key, pub = make_bundle(tmp_path, norm="group")
    m = read_verified(bundle, pub).manifest
    assert m["config"]["file"] is None and "GroupNorm" in m["config"]["reason"]
    assert not (bundle / "config.json").exists() and "No timm `config.json`" in (bundle / "MODEL_CARD.md").read_text()
    (bundle / "config.json").write_text('{"architecture": "test_resnet"}')
    with pytest.raises(BundleVerificationError, match="unsigned file"):
        read_verified(bundle, pub)


def test_changed_config_json_is_refused(signed, tmp_path):
    bundle, _key, pub = signed
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["pretrained_cfg"]["mean"] = [0.5]
    (copy / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleVerificationError, match="timm config mismatch"):
        read_verified(copy, pub)
    proc = subprocess.run([str(Path(sys.executable).with_name("fedrad")), "verify", str(copy), "--pubkey", str(pub)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "config.json" in one_line_error(proc)


def test_model_card_is_a_hugging_face_card_with_the_counts_used(tmp_path):
    """huggingface_hub.ModelCard.load reads the front matter: licence, tags, metrics; no dataset ids. A site
    whose claim was capped shows both numbers and why; ε per site under DP; fine-tuning AUCs as eval results."""
    from huggingface_hub import ModelCard

    from fedrad.server.release import generate_keys, release_bundle

    run = make_run_dir(tmp_path, dp="client")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["sites"]["2"]["num_examples"] = 18.0
        row["capped"] = {"2": "claimed 243 examples, counted as 18 (1.5x the round's median)"}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {"mode": "linear"}, "rows": [
        {"backbone": "pretrained", "mode": "linear", "fraction": 0.1, "auc": 0.81, "ci_low": 0.7, "ci_high": 0.9}]}))
    key, _pub = generate_keys(tmp_path / "k")
    bundle = release_bundle(run, key, tmp_path / "b", finetune_results=results, license_id="cc-by-nc-4.0")
    card = ModelCard.load(bundle / "MODEL_CARD.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-nc-4.0" and data["library_name"] == "timm"
    assert {"fedrad", "federated-learning", "differential-privacy"} <= set(data["tags"])
    assert "datasets" not in data and data["training_data"]["images_claimed"] == 283
    assert data["training_data"]["images_counted"] == 58 and data["metrics"] == ["roc_auc"]
    assert card.data.eval_results[0].metric_value == 0.81
    assert "| site 3 | 243 | 18 | 31.0% | 2 | 3.0000 | 1.0000 |" in card.text
    assert "claimed 243 examples, counted as 18" in card.text and "## Intended use" in card.text


def test_onnx_export_matches_pytorch(signed, exported):
    import onnxruntime as ort

    bundle, _key, pub = signed
    root, lines = exported
    assert "max abs diff" in lines["onnx"]
    session = ort.InferenceSession(str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    backbone, _ = load_verified_backbone(bundle, pub)
    with torch.no_grad():
        want = backbone(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    print(f"ONNX vs PyTorch max abs diff {diff:.3g}")
    assert got.shape == want.shape and diff <= 1e-4


def test_torchscript_export_matches(signed, exported):
    bundle, _key, pub = signed
    root, _ = exported
    scripted = torch.jit.load(str(root / "torchscript" / "model.ts"))
    np.testing.assert_allclose(_features(scripted), _features(load_verified_backbone(bundle, pub)[0]), atol=1e-5)


def test_monai_bundle_export_verifies_with_monai(signed, exported, tmp_path):
    """monai.bundle checks the network's in/out against metadata.json and exports the checkpoint with
    ckpt_export; inference.json's network gives fedrad's features; its preprocessing keeps rows as rows;
    the metadata has every field MONAI's schema requires."""
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
    from PIL import Image

    bundle, _key, pub = signed
    d = exported[0] / "monai-bundle"
    meta, cfg = str(d / "configs" / "metadata.json"), str(d / "configs" / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu", bundle_root=str(d))
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "m.ts"), ckpt_file=str(d / "models" / "model.pt"),
                meta_file=meta, config_file=cfg, bundle_root=str(d), use_trace=True, input_shape=[1, 1, SIZE, SIZE])
    metadata = json.loads(Path(meta).read_text())
    for field in ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                  "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert field in metadata, field
    assert (d / "LICENSE").is_file()
    assert (d / "docs" / "README.md").read_bytes() == (bundle / "MODEL_CARD.md").read_bytes()
    parser = ConfigParser()
    parser.read_config(cfg)
    parser.read_meta(meta)
    parser["bundle_root"], parser["device"] = str(d), "$torch.device('cpu')"
    parser.get_parsed_content("initialize")
    net = parser.get_parsed_content("network")
    np.testing.assert_array_equal(_features(net), _features(load_verified_backbone(bundle, pub)[0]))
    wide = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (40, 1))  # 40 rows x 80 columns, a ramp
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "wide.png")})["image"][0]
    rows, cols = int((image.abs().sum(1) > 0).sum()), int((image.abs().sum(0) > 0).sum())
    assert tuple(image.shape) == (SIZE, SIZE) and rows <= SIZE * 0.6 and cols >= SIZE * 0.9  # padded above/below
    assert float(image.max()) == pytest.approx(1.0, abs=0.05) and float(image.min()) == 0.0


def test_finetune_and_embed_sources_give_the_same_backbone(signed, exported, tmp_path):
    """A release folder, `local-dir:` and the MONAI export load the same verified weights; a MONAI export whose
    model.pt was changed is refused. `fedrad embed` end to end on `local-dir:` and on the MONAI export."""
    from fedrad.client.tools.model_source import load_model_source
    from fedrad.deploy.synthetic import write_synthetic_sites

    bundle, _key, pub = signed
    monai_dir = exported[0] / "monai-bundle"
    want = _features(load_verified_backbone(bundle, pub)[0])
    for source in (bundle, f"local-dir:{bundle}", monai_dir):
        backbone, manifest = load_model_source(source, pub)
        assert manifest["input_size"] == SIZE
        np.testing.assert_array_equal(_features(backbone), want)
    plain = tmp_path / "plain"  # any timm local-dir folder (no fedrad manifest): only with --insecure
    plain.mkdir()
    for name in ("config.json", "weights.safetensors"):
        shutil.copyfile(bundle / name, plain / name)
    backbone, manifest = load_model_source(f"local-dir:{plain}", None, insecure=True)
    assert manifest["model"] == "test_resnet" and manifest["input_size"] == SIZE
    np.testing.assert_array_equal(_features(backbone), want)
    tampered = tmp_path / "m"
    shutil.copytree(monai_dir, tampered)
    state = torch.load(tampered / "models" / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1e-3
    torch.save(state, tampered / "models" / "model.pt")
    with pytest.raises(BundleVerificationError, match="model.pt"):
        load_model_source(tampered, pub)
    site = write_synthetic_sites(tmp_path / "s", n_sites=1, patients_per_site=4, images_per_patient=(1, 2),
                                 size=48, seed=3)[0]
    outs = []
    for n, source in enumerate((f"local-dir:{bundle}", str(monai_dir))):
        out = tmp_path / f"emb{n}"
        assert main(["embed", source, "--pubkey", str(pub), "--data", str(site), "--out", str(out)]) == 0
        outs.append(np.load(out / "embeddings.npy"))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_missing_extra_is_one_line_naming_pip(signed, tmp_path, monkeypatch, capsys):
    bundle, _key, pub = signed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without fedrad[export] has
    assert main(["export", "--format", "onnx", str(bundle), "--pubkey", str(pub), "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pip install 'fedrad[export]'" in err[0] and "onnxruntime" in err[0]
    assert not list(tmp_path.iterdir())


def test_export_refuses_an_unverified_release(signed, tmp_path, capsys):
    bundle, _key, pub = signed
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "MODEL_CARD.md").write_text("changed")
    assert main(["export", "--format", "torchscript", str(copy), "--pubkey", str(pub), "--out",
                 str(tmp_path / "o")]) == 1
    assert "verification FAILED" in capsys.readouterr().err and not (tmp_path / "o").exists()
