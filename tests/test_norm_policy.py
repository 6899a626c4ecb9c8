"""The `norm` run-config key: BatchNorm or GroupNorm for the whole run (coordinator's model, each site's, the
released backbone), per-image DP always GroupNorm, and a bad value refused by name before anything is built."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from torch import nn

from fedrad.common.norms import NORMS
from fedrad.common.recipe import NORM_NAMES
from fedrad.common.run_config import RunConfig


def test_names_are_the_models_norms() -> None:
    assert NORM_NAMES == NORMS


@pytest.mark.parametrize("norm,dp,want", [
    ("batch", "none", "batch"), ("group", "none", "group"), ("batch", "sample", "group"),
    ("group", "sample", "group"), ("batch", "client", "batch"), ("group", "client", "group"),
])
def test_model_norm_is_the_key_but_sample_dp_forces_group(norm: str, dp: str, want: str) -> None:
    valid = {"none": {}, "client": {"dp_noise": 1.0}, "sample": {"dp_noise": 1.0, "objective": "simsiam"}}[dp]
    assert RunConfig(norm=norm, dp=dp, **valid).model_norm == want


def test_flower_key_parses_is_declared_and_a_bad_value_names_it() -> None:
    defaults = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert defaults["config"]["norm"] == RunConfig().norm == "batch"  # Flower drops undeclared keys' overrides
    assert RunConfig.from_flower({"norm": "group"}).model_norm == "group"
    with pytest.raises(ValueError, match="'norm'.*layer"):
        RunConfig.from_flower({"norm": "layer"})


def _kinds(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, nn.GroupNorm | nn.modules.batchnorm._BatchNorm)}


def test_group_run_builds_group_norm_everywhere_and_releases_it(tmp_path) -> None:
    """The coordinator's first model, the site's model layout and the saved backbone all follow the key, and
    the backbone file loads back (by its recorded norm) into the same structure."""
    from fedrad.client.app.task import model_layout
    from fedrad.common.models import load_backbone
    from fedrad.server.rounds import initial_arrays, save_global_backbone

    group = RunConfig(model="test_resnet", image_size=32, proj_dim=16, norm="group", label_fields="")
    batch = RunConfig(model="test_resnet", image_size=32, proj_dim=16, label_fields="")
    arrays, _ = initial_arrays(group)
    keys = set(arrays.keys())
    assert not any(k.endswith(("running_mean", "running_var")) for k in keys)  # no statistics to average
    assert any(k.endswith("running_mean") for k in initial_arrays(batch)[0].keys())
    assert set(model_layout(group).keys) == keys  # a site builds exactly the coordinator's model
    path = save_global_backbone(arrays, group, tmp_path, rounds_done=1)
    assert _kinds(load_backbone("test_resnet", path)) == {nn.GroupNorm}


def test_pretrain_norm_group_writes_a_group_norm_backbone_that_loads_back(tmp_path, capsys) -> None:
    """`fedrad pretrain --norm group`: the centralised baseline of a `norm = "group"` run, recorded in the file."""
    from fedrad.common.models import load_backbone, read_metadata
    from fedrad.deploy.cli import main
    from fedrad.deploy.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=4, images_per_patient=(2, 3),
                                    size=48, seed=5)
    out = tmp_path / "group.safetensors"
    code = main(["pretrain", str(site), "--model", "test_resnet", "--steps", "2", "--batch-size", "6",
                 "--image-size", "32", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--norm", "group",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(out)["norm"] == "group"
    backbone = load_backbone("test_resnet", out)
    kinds = {type(m) for m in backbone.modules()}
    assert nn.GroupNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)


def test_pretrain_rejects_an_unknown_norm(capsys) -> None:
    from fedrad.deploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "somewhere", "--norm", "layer"])
    assert exc.value.code == 2 and "group" in capsys.readouterr().err
