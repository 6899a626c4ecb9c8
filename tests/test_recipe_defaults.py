"""One recipe, defaults in one place: pyproject's app config, RunConfig, `fedrad pretrain`'s options and the
TrainConfig a site or a benchmark builds all read fedrad.common.recipe.Recipe."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from fedrad.common.recipe import OPTIMIZER_NAMES, RECIPE_DEFAULTS, Recipe
from fedrad.common.run_config import RunConfig
from fedrad.deploy.cli import build_parser, main

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def test_pyproject_app_config_is_runconfig_field_by_field() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig()
    names = {_kebab(name) for name in RunConfig.model_fields}
    assert set(declared) == names, (f"only in pyproject: {sorted(set(declared) - names)}; "
                                    f"only in RunConfig: {sorted(names - set(declared))}")
    for name in RunConfig.model_fields:
        value = declared[_kebab(name)]
        want = getattr(defaults, name)
        assert type(value) is type(want) and value == want, f"{_kebab(name)}: pyproject {value!r} != {want!r}"


def test_runconfig_inherits_the_recipe_defaults() -> None:
    run = RunConfig()
    for name in Recipe.recipe_fields():
        assert getattr(run, name) == getattr(RECIPE_DEFAULTS, name), name
    assert run.objective == "supcon"


def _pretrain_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["pretrain"]


def test_pretrain_options_are_every_recipe_switch_with_the_run_defaults() -> None:
    parser = _pretrain_parser()
    args = parser.parse_args(["DIR"])
    run = RunConfig()
    for name in Recipe.recipe_fields():
        assert getattr(args, name) == getattr(run, name), name
    assert Recipe.from_attrs(args) == RECIPE_DEFAULTS
    text = " ".join(parser.format_help().split())
    for name in Recipe.recipe_fields():
        assert f"--{_kebab(name)}" in text, name
        default = getattr(run, name)
        if name not in ("hflip", "init", "init_pubkey"):  # a flag off, and "" explained in words
            assert f"(default: {default})" in text, f"{name}: {default}"
    # Every switch settable, e.g. the ones pretrain could not set before.
    args = parser.parse_args(["DIR", "--aug-rotate", "0", "--lr-schedule", "cosine", "--weight-decay", "0.05",
                              "--proj-dim", "32", "--hflip", "--objective", "simclr"])
    recipe = Recipe.from_attrs(args)
    assert (recipe.aug_rotate, recipe.lr_schedule, recipe.weight_decay, recipe.proj_dim, recipe.hflip,
            recipe.objective) == (0.0, "cosine", 0.05, 32, True, "simclr")


def test_trainconfig_from_recipe_carries_every_training_field() -> None:
    from fedrad.client.app.task import train_config_for
    from fedrad.client.training.trainer import OPTIMIZERS, TrainConfig

    assert OPTIMIZERS == OPTIMIZER_NAMES
    cfg = RunConfig(objective="simclr", batch_size=8, lr=0.01, optimizer="sgd", weight_decay=0.05, temperature=0.3,
                    label_fields="view,sex", hflip=True, image_size=48, aug_rotate=0.0, local_steps=7)
    tc = train_config_for(cfg, "cpu", server_round=2, node_seed=1)
    assert isinstance(tc, TrainConfig)
    assert (tc.objective, tc.steps, tc.batch_size, tc.lr, tc.optimizer, tc.weight_decay, tc.temperature,
            tc.fields_list(), tc.hflip, tc.image_size, tc.device) == (
        "simclr", 7, 8, 0.01, "sgd", 0.05, 0.3, ["view", "sex"], True, 48, "cpu")
    assert tc.augment == cfg.augment_config() and tc.augment.rotate_deg == 0.0
    assert tc.seed == 2 * 7919 + 1


@pytest.mark.parametrize("flag,value", [("--aug-gamma", "0.5"), ("--lr-min", "1"), ("--batch-size", "1")])
def test_pretrain_bad_recipe_value_is_one_line_exit_2(tmp_path, capsys, flag: str, value: str) -> None:
    assert main(["pretrain", str(tmp_path), flag, value, "--out", str(tmp_path / "o.safetensors")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and flag.removeprefix("--") in err[0] and "Traceback" not in err[0]


def test_pretrain_trains_the_recipe_in_rounds(tmp_path, capsys) -> None:
    """A real (tiny) pretrain with switches it could not take before: a cosine schedule over 2 rounds, no
    rotation, weight decay; the weights file records the recipe it trained."""
    from fedrad.common.models import read_metadata
    from fedrad.deploy.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=4, images_per_patient=(2, 3),
                                    size=48, seed=1)
    out = tmp_path / "out.safetensors"
    assert main(["pretrain", str(site), "--model", "test_resnet", "--steps", "3", "--rounds", "2", "--batch-size",
                 "4", "--image-size", "32", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--out", str(out),
                 "--lr-schedule", "cosine", "--lr", "0.01", "--lr-min", "0.001", "--aug-rotate", "0",
                 "--weight-decay", "0.02", "--proj-dim", "16"]) == 0
    assert "supcon" in capsys.readouterr().err  # the run's default objective
    meta = read_metadata(out)
    recipe = json.loads(meta["recipe"])
    assert meta["objective"] == "supcon" and meta["steps"] == "3"
    assert (recipe["lr-schedule"], recipe["aug-rotate"], recipe["weight-decay"], recipe["proj-dim"],
            recipe["rounds"]) == ("cosine", 0.0, 0.02, 16, 2)


def test_run_help_and_pretrain_help_show_the_same_defaults() -> None:
    """Issue 24's "done when": `fedrad pretrain --help` and `fedrad run --help` show the same recipe defaults."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run_help = " ".join(sub.choices["run"].format_help().split())
    pretrain = _pretrain_parser().parse_args(["DIR"])
    for name in Recipe.recipe_fields():
        value = getattr(pretrain, name)
        shown = str(value).lower() if isinstance(value, bool) else (repr(value) if value == "" else value)
        assert f"{_kebab(name)}={shown}" in run_help, name
