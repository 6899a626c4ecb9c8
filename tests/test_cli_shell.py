"""issue 24: the `fedrad` command is a thin shell over typed command functions (fedrad.deploy.commands).

Every subcommand's help works, each calls exactly one typed function with its options as keywords, argparse
lives only in the shell, usage and bad-input errors are one line with exit 2, and `--format json` pipes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

from fedrad.deploy.cli import SHELL_ONLY, build_parser, command_parsers, main

ROOT = Path(__file__).resolve().parents[1]


def _target(sub):
    module, name = sub.get_default("func").__closure__[0].cell_contents.split(":")
    return getattr(importlib.import_module(f"fedrad.deploy.commands.{module}"), name)


def test_each_command_is_one_typed_function_taking_every_option():
    """The shell adds nothing: each option it parses is a keyword of the one function it calls (or goes to its
    **options), and that function's keywords have annotations."""
    for words, sub in command_parsers(build_parser()):
        func = _target(sub)
        params = inspect.signature(func).parameters
        rest = any(p.kind is p.VAR_KEYWORD for p in params.values())
        dests = {a.dest for a in sub._actions if a.dest != "help"} - SHELL_ONLY
        shell_side = {"config"} if words == ("node",) else set()  # node.toml: defaults for the parser itself
        assert rest or dests - shell_side <= set(params), (words, dests - set(params))
        assert all(p.annotation is not inspect.Parameter.empty for p in params.values()), words
        assert func.__module__.startswith("fedrad.deploy.commands."), words


def test_no_argparse_outside_the_shell():
    """argparse is imported by deploy/cli.py only (the site runtime's command line included)."""
    pattern = re.compile(r"^\s*(import argparse|from argparse import)", re.M)
    found = {str(p.relative_to(ROOT)) for d in ("common", "client", "server", "deploy")
             for p in (ROOT / d).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))}
    assert found == {"deploy/cli.py"}


@pytest.mark.parametrize("argv", [["scan", "--max-pixels", "x"], ["runs", "--format", "yaml"], ["nosuch"],
                                  ["verify", "b"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fedrad scan: error: folder not found")
    assert main(["releases", "--state-dir", str(tmp_path / "none")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_api_raises_typed_errors(tmp_path):
    import fedrad

    with pytest.raises(fedrad.BadInput) as bad:
        fedrad.embed(tmp_path / "nope", tmp_path, tmp_path / "out")  # no --pubkey and not insecure
    assert bad.value.exit_code == 2 and isinstance(bad.value, ValueError)
    assert issubclass(fedrad.BundleRefused, fedrad.Refused) and issubclass(fedrad.Refused, fedrad.FedradError)


def test_scan_and_releases_print_json(tmp_path, capsys):
    from dicom_fixtures import small_dicom

    small_dicom(tmp_path / "site" / "a.dcm")
    assert main(["scan", str(tmp_path / "site"), "--no-decode", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 1
    (tmp_path / "state").mkdir()
    assert main(["releases", "--state-dir", str(tmp_path / "state"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
