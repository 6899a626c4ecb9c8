"""`init`: the first model from a local timm checkpoint (RGB stem summed to one channel, as timm does it) or from
a verified earlier release, on the coordinator (`initial_arrays`, run.json, the release manifest) and in
`fedrad pretrain --init`; bad paths are one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import timm
import torch
from release_fixtures import MODEL, SIZE, make_bundle, resign
from safetensors.torch import load_file, save_file

from fedrad.common.bundle import BundleVerificationError
from fedrad.common.init_weights import KIND_CHECKPOINT, KIND_RELEASE, apply_init, init_backbone, init_kind
from fedrad.common.models import build_model, load_timm_checkpoint
from fedrad.common.run_config import RunConfig
from fedrad.deploy.cli import main


def _rgb_checkpoint(path, seed: int = 5, wrap: bool = False) -> dict[str, torch.Tensor]:
    """An 'ImageNet-style' RGB test_resnet with a 1000-class head, saved as safetensors or a wrapped .pth."""
    torch.manual_seed(seed)
    net = timm.create_model(MODEL, pretrained=False, in_chans=3, num_classes=1000)
    with torch.no_grad():  # BN statistics that differ from a fresh model's, so loading them is visible
        for name, buf in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    elif wrap:  # a training checkpoint: {"state_dict": ...} with DDP's "module." prefix, as timm unwraps it
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return state


def _check_adapted(backbone: torch.nn.Module, rgb: dict[str, torch.Tensor]) -> None:
    got = backbone.state_dict()
    stem = "conv1.0.weight"
    assert got[stem].shape[1] == 1 and rgb[stem].shape[1] == 3
    assert torch.allclose(got[stem], rgb[stem].sum(dim=1, keepdim=True))
    for key, value in got.items():
        if key != stem:
            assert torch.equal(value, rgb[key]), key
    assert not any(k.startswith("fc.") for k in got)  # the ImageNet classifier is dropped


@pytest.mark.parametrize("name,wrap", [("imagenet.safetensors", False), ("imagenet.pth", False),
                                       ("train-ckpt.pth", True)])
def test_timm_checkpoint_first_conv_summed_rest_equal(tmp_path, name: str, wrap: bool) -> None:
    rgb = _rgb_checkpoint(tmp_path / name, wrap=wrap)
    backbone = load_timm_checkpoint(MODEL, tmp_path / name)
    _check_adapted(backbone, rgb)
    with torch.no_grad():
        assert backbone.eval()(torch.rand(2, 1, SIZE, SIZE)).shape == (2, backbone.num_features)


def test_checkpoint_of_another_architecture_is_refused_by_name(tmp_path) -> None:
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=0).state_dict().items()},
              str(path))
    with pytest.raises(ValueError, match=r"r18\.safetensors"):
        load_timm_checkpoint(MODEL, path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable state_dict"):
        load_timm_checkpoint(MODEL, junk)
    code = tmp_path / "code.pth"  # a pickle that would build an arbitrary object: torch.load(weights_only) refuses
    torch.save({"conv1.0.weight": _Arbitrary()}, code)
    with pytest.raises(ValueError, match=r"code\.pth: not a readable state_dict"):
        load_timm_checkpoint(MODEL, code)


class _Arbitrary:
    """Stands for any class a malicious .pth could ask the unpickler to build."""


def test_init_kind_names_the_bad_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        init_kind(tmp_path / "nowhere.safetensors", None)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="weights.txt"):
        init_kind(tmp_path / "weights.txt", None)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a fedrad release bundle"):
        init_kind(tmp_path / "folder", None)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("init-release"))


def test_init_from_an_earlier_release_is_verified_then_loaded(release, tmp_path) -> None:
    bundle, key, pub = release
    with pytest.raises(ValueError, match="init-pubkey"):
        init_kind(bundle, None)
    assert init_kind(bundle, pub) == KIND_RELEASE
    torch.manual_seed(0)
    model = build_model(MODEL, "micle", SIZE, proj_dim=16)
    heads_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    record = apply_init(model, bundle, pub, MODEL, SIZE)
    released = load_file(bundle / "weights.safetensors")
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, released[k]), k
    for k, v in model.projector.state_dict().items():
        assert torch.equal(v, heads_before[k])  # the heads keep their own (seeded) init
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert record.kind == KIND_RELEASE and record.sha256 == manifest["weights"]["sha256"]
    assert record.release["run_id"] == manifest["release"]["run_id"] and record.release["sequence"] == 1
    # Tampered: refused before a byte is used. Another model: refused by name.
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["rounds"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleVerificationError, match="signature invalid"):
        init_backbone(bad, pub, MODEL, SIZE)
    other = tmp_path / "other-model"
    shutil.copytree(bundle, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model"] = "resnet10t"
    from fedrad.common.bundle import manifest_bytes

    resign(other, key, manifest_bytes(m))
    with pytest.raises(BundleVerificationError):  # resnet10t weights do not fit: refused at verification
        init_backbone(other, pub, MODEL, SIZE)


def test_coordinator_initial_model_and_record(tmp_path, release) -> None:
    from fedrad.server.release import release_bundle
    from fedrad.server.rounds import initial_arrays

    ckpt = tmp_path / "imagenet.safetensors"
    rgb = _rgb_checkpoint(ckpt)
    cfg = RunConfig(model=MODEL, objective="supcon", image_size=SIZE, proj_dim=16, init=str(ckpt))
    arrays, record = initial_arrays(cfg)
    state = arrays.to_torch_state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    net = timm.create_model(MODEL, in_chans=1, num_classes=0)
    net.load_state_dict(backbone, strict=True)
    _check_adapted(net, rgb)
    assert record == {"kind": KIND_CHECKPOINT, "path": str(ckpt.resolve()),
                      "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    # Same seed, no init: the heads are identical, the backbone is not.
    plain, none = initial_arrays(RunConfig(model=MODEL, objective="supcon", image_size=SIZE, proj_dim=16))
    assert none is None
    plain_state = plain.to_torch_state_dict()
    assert torch.equal(plain_state["projector.0.weight"], state["projector.0.weight"])
    assert not torch.equal(plain_state["backbone.conv1.0.weight"], state["backbone.conv1.0.weight"])
    # The record travels from run.json into the release manifest.
    bundle, key, _pub = release
    run = bundle.parent / "run"
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "init": record}))
    out = release_bundle(run, key, tmp_path / "bundle2")
    assert json.loads((out / "manifest.json").read_text())["init"] == record


def test_fedrad_run_checks_init_before_submitting(tmp_path) -> None:
    from fedrad.deploy.run_command import validate_run_config

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        validate_run_config({"init": str(tmp_path / "missing.safetensors")})


def test_pretrain_init_end_to_end_and_bad_path(tmp_path, capsys) -> None:
    from fedrad.common.models import read_metadata
    from fedrad.deploy.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=4, images_per_patient=(2, 3),
                                    size=48, seed=1)
    ckpt = tmp_path / "imagenet.pth"
    rgb = _rgb_checkpoint(ckpt)
    out = tmp_path / "out.safetensors"
    common = ["pretrain", str(site), "--objective", "simclr", "--model", MODEL, "--steps", "1", "--batch-size", "4",
              "--image-size", "32", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    # lr 0: the convolutions stay exactly as loaded, so the written file shows the init took effect.
    assert main([*common, "--lr", "0", "--init", str(ckpt)]) == 0
    assert "init: timm-checkpoint" in capsys.readouterr().err
    written = load_file(out)
    assert torch.allclose(written["conv1.0.weight"], rgb["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(written["layer1.0.conv1.weight"], rgb["layer1.0.conv1.weight"])
    meta_init = json.loads(read_metadata(out)["init"])
    assert meta_init["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()

    assert main([*common, "--init", str(tmp_path / "nope.pth")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "nope.pth" in err[0] and "Traceback" not in err[0]
