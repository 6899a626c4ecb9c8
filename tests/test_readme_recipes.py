"""The README's hospital-IT and operator recipes, run as printed: TLS, SuperNode authentication, a signed run, a
signed release published to the site, and the site verifying what it received.

The blocks run are the fenced ```bash blocks that follow a `<!-- recipe: NAME -->` comment in README.md; a README
edit that drops or renames one fails this test. Each command runs with bash in its own working folder (the
operator's and the site's, both holding a `.venv` link to this venv, as a checkout made by `deploy/setup.sh` does),
in this order: operator-setup, (the handover the README describes), site, operator-run, site-release.
`fedrad coordinator` and `fedrad node` keep running: they start in the background, their output redirected to a
log file by the shell (as a service manager does), and are stopped at the end.

The only changes made to the printed text (SUBSTITUTIONS and two insertions, listed below) put the machine name,
ports and system folders on this machine, and shrink the run: the README's run trains resnet50 at 224 px for 20
rounds on two sites. Outside the text: the `.venv` links, the synthetic DICOM folder at /data/dicom (under the
temp folder), and the handover of `site-a-certs` and `consortium.pub` that the README describes in words.

Beyond the README, two nodes started with its node command must not take part (an unenrolled key; a consortium
CA other than the coordinator's): this test also stands for the TLS + node-authentication test that
tests/test_certs.py used to run on its own federation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedrad.deploy.processes import ProcessGroup, free_port, wait_for_port

README = Path(__file__).resolve().parent.parent / "README.md"
RECIPE_BLOCK = re.compile(r"<!-- recipe: ([\w-]+)[^>]*-->\s*\n```bash\n(.*?)\n```", re.S)
RECIPES = ("operator-setup", "site", "operator-run", "site-release")
LONG_RUNNING = re.compile(r"^\.venv/bin/fedrad (coordinator|node) ")

# Every change made to a printed command. Text replacements, applied to every command:
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"coordinator\.example\.org", "127.0.0.1"),             # the coordinator is this machine
    (r"(?<=[: ])8000\b", "{port}"),                           # its port: a free one, not 8000
    (r"(?<=[ =])/(data|etc|var)/", r"{root}/\1/"),            # /data, /etc, /var under the test's temp folder
]
# Two insertions: `fedrad node` gets `--port N` (its local Runtime API port, default 9094, may be taken on a shared
# test machine; README: "fedrad node --data DIR --port 9101" when several run on one machine); `fedrad run` gets
# SMALL_RUN after the README's -c values (later -c values win, as the README says): one round of a tiny model at a
# single site instead of 20 rounds of resnet50 at 224 px on two (min-*-nodes defaults to 2).
SMALL_RUN = ("-c model=test_resnet -c image-size=32 -c proj-dim=32 -c local-steps=2 -c batch-size=8 "
             "-c num-server-rounds=1 -c min-train-nodes=1 -c min-available-nodes=1")


def recipe_commands(text: str) -> dict[str, list[str]]:
    """{recipe name: its commands}: backslash continuations joined, comment-only and blank lines left out."""
    blocks: dict[str, list[str]] = {}
    for name, body in RECIPE_BLOCK.findall(text):
        assert name not in blocks, f"README: two blocks marked 'recipe: {name}'"
        joined = re.sub(r"\\\n\s*", " ", body)
        blocks[name] = [line.strip() for line in joined.splitlines()
                        if line.strip() and not line.strip().startswith("#")]
    return blocks


def substitute(command: str, root: Path, port: int, node_port: int) -> str:
    """One printed command with the SUBSTITUTIONS and the two insertions made."""
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement.format(root=root, port=port), command)
    if command.startswith(".venv/bin/fedrad node "):
        command = command.replace(" --superlink ", f" --port {node_port} --superlink ", 1)
    if command.startswith(".venv/bin/fedrad run "):
        command = re.sub(r"(-c strategy=\S+)", r"\1 " + SMALL_RUN, command)
    return command


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"README command failed ({out.returncode}) in {cwd.name}/: {command}\n{text[-3000:]}"
    return text


def test_recipe_blocks_are_marked_and_hold_the_commands_run():
    """Fast: every recipe block is there, and its long-running commands are the ones started in the background."""
    blocks = recipe_commands(README.read_text(encoding="utf-8"))
    assert set(RECIPES) <= set(blocks), sorted(blocks)
    assert [c for c in blocks["operator-setup"] if LONG_RUNNING.match(c)][0].startswith(".venv/bin/fedrad coordinator")
    assert [c for c in blocks["site"] if LONG_RUNNING.match(c)][0].startswith(".venv/bin/fedrad node")
    assert any(c.startswith(".venv/bin/fedrad run ") and "-c strategy=" in c for c in blocks["operator-run"])
    node = substitute(blocks["site"][-1], Path("/r"), 1234, 5678)
    assert "--superlink 127.0.0.1:1234" in node and "--data /r/data/dicom" in node and "--port 5678" in node
    assert "--state-dir /r/var/lib/fedrad/site-a" in node


@pytest.mark.slow
def test_readme_operator_and_hospital_recipes_run_as_printed(tmp_path):
    from fedrad.common.bundle import verify_bundle
    from fedrad.deploy.synthetic import write_synthetic_sites
    from fedrad.server.run_log import read_metrics

    blocks = recipe_commands(README.read_text(encoding="utf-8"))
    root, port, node_port = tmp_path, free_port(), free_port()
    operator, site = root / "operator", root / "site-a"
    venv = Path(sys.executable).parent.parent
    for folder in (operator, site):
        folder.mkdir()
        (folder / ".venv").symlink_to(venv)
    dicom = write_synthetic_sites(root / "synthetic", n_sites=1, patients_per_site=6, images_per_patient=(1, 3),
                                  size=64, seed=3)[0]
    (root / "data").mkdir()
    dicom.rename(root / "data" / "dicom")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = root / "logs"
    logs.mkdir()
    outputs: dict[str, str] = {}
    group = ProcessGroup()

    def play(recipe: str, cwd: Path) -> None:
        for printed in blocks[recipe]:
            command = substitute(printed, root, port, node_port)
            if LONG_RUNNING.match(command):
                name = command.split()[1]
                log = logs / f"{cwd.name}-{name}.log"
                _background(group, name, command, log, cwd, env)
                if name == "coordinator":
                    wait_for_port("127.0.0.1", port, 60, group.procs[-1][1])
            else:
                outputs[printed] = _run(command, cwd, env)

    try:
        play("operator-setup", operator)
        # The handover the README describes: the site's own certificate folder and the consortium's public key.
        shutil.copytree(operator / "fedrad-certs" / "sites" / "site-a", site / "site-a-certs")
        shutil.copyfile(operator / "consortium.pub", site / "consortium.pub")
        play("site", site)
        intruders = _start_intruders(group, blocks["site"][-1], root, port, operator, env, logs)
        play("operator-run", operator)
        play("site-release", site)
        alive = {name: proc.poll() is None for name, proc in group.procs}
        intruder_exits = {name: _exit_code(proc, 60) for name, proc in intruders.items()}
    finally:
        group.stop()

    (run_output,) = [out for cmd, out in outputs.items() if cmd.startswith(".venv/bin/fedrad run ")]
    coordinator_log = (logs / "operator-coordinator.log").read_text()
    node_log = (logs / "site-a-node.log").read_text()
    assert alive["coordinator"] and alive["node"], node_log[-2000:]
    # The run: one round, trained at site-a, which the coordinator names by its enrolment.
    (row,) = read_metrics(operator / "runs" / "r1")
    assert row["sites_answered"] == 1 and list(row["site_names"].values()) == ["site-a"], row
    assert re.search(r"round 1 train \(micle\)", node_log), node_log[-2000:]  # the site's own progress line
    assert "per site: site-a loss" in run_output, run_output[-3000:]
    run_log = (operator / "runs" / "r1" / "flwr-run.log").read_text()
    for text in (coordinator_log, node_log, run_log, run_output):  # log files and redirected output: plain text
        assert "\x1b[" not in text and "INFO" in text
    (listing,) = [out for cmd, out in outputs.items() if cmd.startswith(".venv/bin/fedrad runs ")]
    assert re.search(r" 1/1 .*runs/r1", listing), listing
    # The release: signed, published (`release --publish` exits 0 only when a site stored it), and held by the
    # site, which verified it on arrival and again in `fedrad releases`; verified once more here.
    assert (operator / "runs" / "r1" / "release" / "manifest.sig").is_file()
    (listing,) = [out for cmd, out in outputs.items() if cmd.startswith(".venv/bin/fedrad releases ")]
    assert "verified" in listing and "latest:" in listing, listing
    held = [p.parent for p in (root / "var" / "lib" / "fedrad" / "site-a").rglob("manifest.sig")]
    assert len(held) == 1, held
    verify_bundle(held[0], site / "consortium.pub")
    assert "site-a" in (held[0] / "MODEL_CARD.md").read_text()
    assert (held[0] / "config.json").is_file()  # timm's config travels with the release; exported from it:
    assert (site / "monai-bundle" / "configs" / "metadata.json").is_file()
    # Beyond the README: a node with an unenrolled key is refused; one that trusts another CA gets nothing.
    for name, code in intruder_exits.items():
        log = (logs / f"{name}-node.log").read_text()
        assert code not in (None, 0) and "Receiving:" not in log, (name, code, log[-2000:])
    assert "No SuperNode found" in coordinator_log  # the stranger's key
    assert "CERTIFICATE_VERIFY_FAILED" in (logs / "untrusting-node.log").read_text()  # the coordinator's certificate


def _background(group: ProcessGroup, name: str, command: str, log: Path, cwd: Path,
                env: dict[str, str]) -> subprocess.Popen:
    """Start a long-running printed command with its output in `log`, redirected by the shell as a service manager
    does (so `fedrad` sees no terminal), stopped with the group."""
    return group.start(name, ["bash", "-c", f"exec >{log} 2>&1\nexec {command}"], log.with_suffix(".pump"),
                       env=env, cwd=cwd)


def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _start_intruders(group: ProcessGroup, node_command: str, root: Path, port: int, operator: Path,
                     env: dict[str, str], logs: Path) -> dict[str, subprocess.Popen]:
    """Two nodes started with the README's node command that must not take part: `stranger` holds the consortium
    CA and a key the coordinator never enrolled; `untrusting` holds enrolled site-b's key but another CA."""
    from fedrad.deploy.certs import init_certs

    init_certs(root / "elsewhere", ["site-a"], ["127.0.0.1"])
    sites = operator / "fedrad-certs" / "sites"
    procs = {}
    for name, ca, keys in [("stranger", operator / "fedrad-certs" / "ca.pem", root / "elsewhere" / "sites" / "site-a"),
                           ("untrusting", root / "elsewhere" / "ca.pem", sites / "site-b")]:
        cwd = root / name
        (cwd / "state").mkdir(parents=True)
        (cwd / ".venv").symlink_to(Path(sys.executable).parent.parent)
        shutil.copytree(keys, cwd / "site-a-certs")
        shutil.copyfile(ca, cwd / "site-a-certs" / "ca.pem")
        shutil.copyfile(operator / "consortium.pub", cwd / "consortium.pub")
        command = substitute(node_command, root, port, free_port())
        command = command.replace(f"{root}/var/lib/fedrad/site-a", f"{cwd}/state")
        log = logs / f"{name}-node.log"
        procs[name] = _background(group, name, command, log, cwd, env)
    return procs
