"""Backbones build for grayscale small inputs; released files load with plain timm."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from fedrad.common.models import (
    KNOWN_MODELS,
    ContrastiveModel,
    build_model,
    create_backbone,
    load_backbone,
    read_metadata,
    save_backbone,
    trainable_state,
)


@pytest.mark.parametrize("name", KNOWN_MODELS)
def test_backbone_builds_grayscale(name: str) -> None:
    size = 64 if "vit" in name else 32
    bb = create_backbone(name, in_chans=1, image_size=size).eval()
    with torch.no_grad():
        out = bb(torch.rand(2, 1, size, size))
    assert out.shape == (2, bb.num_features)
    assert torch.isfinite(out).all()


def test_unknown_model_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        create_backbone("no_such_net")


@pytest.mark.parametrize("objective,has_pred", [("simclr", False), ("supcon", False), ("micle", False),
                                                 ("simsiam", True), ("byol", True)])
def test_build_model_heads(objective: str, has_pred: bool) -> None:
    m = build_model("test_resnet", objective, 32, proj_dim=16)
    assert isinstance(m, ContrastiveModel)
    assert m.head_names == (("projector", "predictor") if has_pred else ("projector",))
    assert (getattr(m, "predictor", None) is not None) == has_pred
    z = m(torch.rand(4, 1, 32, 32))
    assert z.shape == (4, 16)
    assert m.embed(torch.rand(4, 1, 32, 32)).shape == (4, m.backbone.num_features)


def test_trainable_state_has_bn_buffers() -> None:
    m = build_model("test_resnet", "simclr", 32)
    state = trainable_state(m)
    assert state.keys() == m.state_dict().keys()
    assert any(k.endswith("running_mean") for k in state)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_save_load_round_trip_with_plain_timm(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, "simclr", 32)
    model.train()
    model(torch.rand(4, 1, 32, 32))  # move BN running stats off their init
    path = tmp_path / "sub" / "w.safetensors"
    save_backbone(model.backbone, path, {"model": name, "image_size": 32, "objective": "simclr", "steps": 3})
    assert os.listdir(path.parent) == ["w.safetensors"]  # temp file replaced, nothing left behind
    meta = read_metadata(path)
    assert meta["model"] == name and meta["in_chans"] == "1" and meta["image_size"] == "32"

    plain = timm.create_model(name, in_chans=1, num_classes=0)
    plain.load_state_dict(load_file(path))  # strict by default: every key and shape matches
    ours = load_backbone(name, path)
    x = torch.rand(2, 1, 32, 32)
    model.eval(), plain.eval(), ours.eval()
    with torch.no_grad():
        ref = model.backbone(x)
        assert torch.equal(plain(x), ref)
        assert torch.equal(ours(x), ref)


def test_save_accepts_contrastive_model_and_vit_size(tmp_path) -> None:
    model = build_model("vit_tiny_patch16_224", "simclr", 64)
    path = tmp_path / "vit.safetensors"
    save_backbone(model, path, {"model": "vit_tiny_patch16_224", "image_size": 64})
    assert not any(k.startswith("projector") for k in load_file(path))
    plain = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=64)
    plain.load_state_dict(load_file(path))
    loaded = load_backbone("vit_tiny_patch16_224", path)  # image size read from the metadata
    assert loaded.patch_embed.img_size == (64, 64)
