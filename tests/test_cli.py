"""The `fedrad` command: every subcommand is wired to a real handler, help reads, bad input exits 2."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fedrad.deploy.cli import build_parser, command_parsers, main


def _handlers(parser) -> list[tuple[str, str]]:
    return [(" ".join(words), sub.get_default("func").__closure__[0].cell_contents)
            for words, sub in command_parsers(parser)]


def test_every_subcommand_points_at_an_existing_function():
    handlers = _handlers(build_parser())
    names = {n for n, _ in handlers}
    assert {"scan", "pretrain", "coordinator", "node", "run", "demo", "keys generate", "release", "verify",
            "finetune", "embed", "certs init", "certs register"} <= names
    for name, target in handlers:
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(f"fedrad.deploy.commands.{module}"), func)), name


def test_help_and_version_exit_zero():
    out = subprocess.run([sys.executable, "-m", "fedrad.deploy.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fedrad demo" in out.stdout
    assert main(["--version"]) == 0


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    code = main(["node", "--data", str(missing), "--no-scan"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_node_refuses_to_start_without_a_consortium_key(tmp_path, capsys):
    code = main(["node", "--data", str(tmp_path), "--no-scan"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--consortium-key" in err and len(err.strip().splitlines()) == 1


def test_node_refuses_plaintext_to_a_remote_coordinator(tmp_path, capsys):
    from fedrad.server.release import generate_keys

    _, pub = generate_keys(tmp_path / "consortium")
    code = main(["node", "--data", str(tmp_path), "--no-scan", "--consortium-key", str(pub),
                 "--superlink", "10.1.2.3:8000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "10.1.2.3:8000" in err and "--insecure" in err and len(err.strip().splitlines()) == 1


def test_node_names_a_bad_consortium_key(tmp_path, capsys):
    bad = tmp_path / "consortium.pub"
    bad.write_text("not a key")
    assert main(["node", "--data", str(tmp_path), "--no-scan", "--consortium-key", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_run_names_a_missing_signing_key(tmp_path, capsys):
    missing = tmp_path / "consortium.key"
    code = main(["run", "--run-dir", str(tmp_path / "run"), "--sign-key", str(missing)])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_every_subcommand_help_runs_and_shows_defaults(capsys):
    leaves = list(command_parsers(build_parser()))
    assert len(leaves) >= 25
    for words, _ in leaves:
        with pytest.raises(SystemExit) as done:
            main([*words, "--help"])
        assert done.value.code == 0, words
        out = capsys.readouterr().out
        assert out.startswith("usage: fedrad " + " ".join(words)), words
        assert "default" in out, words


def test_every_option_has_help_and_a_stated_default():
    """Help text everywhere; an option whose default is None says in words what happens without it."""
    import argparse

    for words, sub in command_parsers(build_parser()):
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (words, action.dest)
            if action.option_strings and action.default is None and not action.required:
                assert "default" in action.help.lower(), (words, action.dest)


def test_exit_codes_are_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]
    for code in ("0", "1", "2", "130"):
        assert f"`{code}`" in section
    out = subprocess.run([sys.executable, "-m", "fedrad.deploy.cli", "--help"], capture_output=True, text=True)
    assert "exit codes:" in out.stdout
