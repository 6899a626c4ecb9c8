"""Command-line options generated from the training recipe (fedrad.common.recipe.Recipe), one per field.

`fedrad pretrain` takes every recipe switch a federated run takes (`fedrad run -c KEY=VALUE`), under the same
name and with the same default, because both come from the one `Recipe` declaration.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedrad.common.recipe import NORM_NAMES, OPTIMIZER_NAMES, Recipe


def _choices(kind: str | None) -> tuple[str, ...] | None:
    """The allowed names of a recipe field whose metadata names where they are declared."""
    if kind == "objectives":
        from fedrad.common.losses import OBJECTIVES

        return tuple(OBJECTIVES)
    if kind == "lr_schedules":
        from fedrad.common.lr_schedule import LR_SCHEDULES

        return LR_SCHEDULES
    return {"optimizers": OPTIMIZER_NAMES, "norms": NORM_NAMES, None: None}[kind]


def add_recipe_options(parser: argparse.ArgumentParser, title: str = "training recipe (as `fedrad run -c KEY=VALUE`)"
                       ) -> None:
    """One `--key` option per recipe field: its type, its default and its help from the declaration."""
    group = parser.add_argument_group(title)
    for name in Recipe.recipe_fields():
        default, help_line, kind = Recipe.field_help(name)
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"default": default, "help": help_line, "dest": name}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(default)
            choices = _choices(kind)
            if choices:
                kw["choices"] = choices
        group.add_argument(flag, **kw)



def recipe_defaults_text() -> str:
    """`fedrad run --help`'s list of the training recipe's keys and defaults: the same declaration and values as
    `fedrad pretrain --help` (and pyproject's app config, tests/test_recipe_defaults.py)."""
    pairs = []
    for name in Recipe.recipe_fields():
        default = Recipe.field_help(name)[0]
        shown = str(default).lower() if isinstance(default, bool) else (repr(default) if default == "" else default)
        pairs.append(f"{name.replace('_', '-')}={shown}")
    return ("training recipe run-config keys and their defaults (the same as `fedrad pretrain --help`; set one with "
            "-c KEY=VALUE): " + ", ".join(pairs))
