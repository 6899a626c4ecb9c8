"""The `fedrad` command: every subcommand is wired to a real handler, help reads, bad input exits 2."""

from __future__ import annotations

import importlib
import subprocess
import sys

from fedrad.deploy.cli import build_parser, main


def _handlers(parser) -> list[tuple[str, str]]:
    out = []
    for action in parser._subparsers._group_actions:  # argparse keeps subcommands here
        for name, sub in action.choices.items():
            func = sub.get_default("func")
            if func is not None:
                out.append((name, func.__closure__[0].cell_contents))
            if sub._subparsers is not None:
                out += [(f"{name} {n}", t) for n, t in _handlers(sub)]
    return out


def test_every_subcommand_points_at_an_existing_function():
    handlers = _handlers(build_parser())
    names = {n for n, _ in handlers}
    assert {"scan", "pretrain", "coordinator", "node", "run", "demo", "keys generate", "release", "verify",
            "finetune", "embed", "certs init", "certs register"} <= names
    for name, target in handlers:
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_help_and_version_exit_zero():
    out = subprocess.run([sys.executable, "-m", "fedrad.deploy.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fedrad demo" in out.stdout
    assert main(["--version"]) == 0


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    code = main(["node", "--data", str(missing), "--no-scan"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
