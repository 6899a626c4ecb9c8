"""The deployment artefacts run the tested `fedrad` commands: compose, Kubernetes and systemd, through one entrypoint.

No container engine can start containers in CI, so these tests run deploy/container/entrypoint.sh outside a
container with the environment each artefact gives it (the image's ENV, then the compose/Kubernetes/systemd
settings) and each volume or mount replaced by a folder: the commands inside the images are the ones tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedrad.deploy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "container" / "entrypoint.sh"
BIN = Path(sys.executable).parent

# Settings whose node flag other branches add; where this fedrad lacks the flag the entrypoint refuses to start
# (it never drops a setting that tightens what a site accepts), so the tests leave them out until it is there.
PENDING_NODE_FLAGS = {"FEDRAD_CONSORTIUM_KEY": "--consortium-key", "FEDRAD_POLICY": "--policy"}


def node_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {s for action in sub.choices["node"]._actions for s in action.option_strings}


def image_env(target: str) -> dict[str, str]:
    """The FEDRAD_/FLWR_ variables the Dockerfile's ENV lines give the `runtime` stage and then `target`."""
    env: dict[str, str] = {}
    stage = None
    text = (DEPLOY / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            stage = m.group(1)
        elif line.startswith("ENV ") and stage in ("runtime", target):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                if key.startswith(("FEDRAD_", "FLWR_")):
                    env[key] = value
    return env


def base_env(tmp: Path) -> dict[str, str]:
    """This machine's environment minus any FEDRAD_ setting, with this venv's fedrad first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDRAD_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp)
    env["FEDRAD_CONFIG"] = str(tmp / "no-config-file.env")
    (tmp / "no-config-file.env").write_text("")
    return env


def remap(value: str, mounts: dict[str, Path]) -> str:
    """Container paths (one, or a comma-separated list) -> the folders standing in for the volumes mounted there."""

    def one(path: str) -> str:
        for target in sorted(mounts, key=len, reverse=True):  # the longest mount that holds the path
            if path == target or path.startswith(target + "/"):
                return str(mounts[target]) + path[len(target):]
        return path

    return ",".join(one(part) for part in value.split(","))


def entrypoint(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def dry_run(args: list[str], env: dict[str, str]) -> list[str]:
    """The command the entrypoint would exec, one argument per line after its header."""
    proc = entrypoint(args, {**env, "FEDRAD_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "fedrad-entrypoint: would run:"
    return lines[1:]


def parse_fedrad(argv: list[str]):
    """Parse with fedrad's own CLI parser: an unknown flag or a missing value fails here, as at run time."""
    assert argv[0] == "fedrad"
    return build_parser().parse_args(argv[1:])


def without_pending(env: dict[str, str]) -> dict[str, str]:
    flags = node_flags()
    return {k: v for k, v in env.items() if not (k in PENDING_NODE_FLAGS and PENDING_NODE_FLAGS[k] not in flags)}


# --- compose ----------------------------------------------------------------------------------------------


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} from `variables` (what an --env-file gives)."""

    def value(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in variables:
            return variables[name]
        assert op == ":-", f"compose needs {name}: {rest}"
        return rest

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", value, text)


def compose_service(file: str, name: str, tmp: Path, variables: dict[str, str] | None = None
                    ) -> tuple[list[str], dict[str, str], dict[str, Path], set]:
    """(command, environment, mounts -> folders, read-only mount targets) of one compose service."""
    text = interpolate((DEPLOY / "compose" / file).read_text(), variables or {})
    service = yaml.safe_load(text)["services"][name]
    target = service.get("build", {}).get("target") or service["image"].split(":")[0].removeprefix("fedrad-")
    mounts: dict[str, Path] = {"/tmp": tmp / "tmpfs"}
    read_only = set()
    for volume in service.get("volumes", []):
        source, target_path, *mode = volume.split(":")
        folder = tmp / "volumes" / re.sub(r"\W+", "_", source).strip("_")
        folder.mkdir(parents=True, exist_ok=True)
        mounts[target_path] = folder
        if mode == ["ro"]:
            read_only.add(target_path)
    env = {k: remap(v, mounts) for k, v in image_env(target).items()}
    env.update({k: remap(str(v), mounts) for k, v in service.get("environment", {}).items()})
    return service["command"], env, mounts, read_only


def test_compose_demo_services_give_valid_fedrad_commands(tmp_path):
    flags = node_flags()
    (tmp_path / "volumes" / "consortium" / "certs").mkdir(parents=True)  # what the init job writes
    cmd, env, mounts, ro = compose_service("compose.yaml", "coordinator", tmp_path)
    args = parse_fedrad(dry_run(cmd, {**base_env(tmp_path), **env}))
    assert args.command == "coordinator" and args.port == 8000 and args.host == "0.0.0.0"
    assert args.certs == str(mounts["/consortium"] / "certs") and "/consortium" in ro  # TLS + node auth on
    assert args.state == str(mounts["/var/lib/fedrad"])

    for site in ("site-a", "site-b", "site-c"):
        cmd, env, mounts, ro = compose_service("compose.yaml", site, tmp_path)
        argv = dry_run(cmd, {**base_env(tmp_path), **without_pending(env)})
        args = parse_fedrad(argv)
        assert args.command == "node" and args.superlink == "coordinator:8000" and args.site_name == site
        assert args.data == str(mounts["/consortium"] / "sites" / site) and "/consortium" in ro
        assert args.cache == str(mounts["/var/cache/fedrad"])
        assert args.audit_dir == str(mounts["/var/lib/fedrad/state"] / "audit")
        if "--state-dir" in flags:
            assert args.state_dir == str(mounts["/var/lib/fedrad/state"])
        if "--consortium-key" in flags:
            assert args.consortium_key == str(mounts["/consortium"] / "certs" / "consortium.pub")


def test_compose_real_site_mounts_dicom_and_keys_read_only(tmp_path):
    example = (DEPLOY / "compose" / "site.env.example").read_text().splitlines()
    variables = dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    cmd, env, mounts, ro = compose_service("site.yaml", "node", tmp_path, variables)
    assert ro == {"/data/dicom", "/etc/fedrad/certs", "/etc/fedrad/consortium.pub"}
    assert set(mounts) - ro == {"/tmp", "/var/lib/fedrad/state", "/var/cache/fedrad"}
    service = yaml.safe_load(interpolate((DEPLOY / "compose" / "site.yaml").read_text(), variables))
    node = service["services"]["node"]
    assert node["read_only"] is True and node["cap_drop"] == ["ALL"]
    args = parse_fedrad(dry_run(cmd, {**base_env(tmp_path), **without_pending(env)}))
    assert args.superlink == variables["FEDRAD_SUPERLINK"] and args.site_name == variables["FEDRAD_SITE"]
    assert args.data == str(mounts["/data/dicom"]) and args.certs == str(mounts["/etc/fedrad/certs"])
    with pytest.raises(AssertionError, match="FEDRAD_DICOM_DIR"):  # compose refuses to start without it
        compose_service("site.yaml", "node", tmp_path, {"FEDRAD_SUPERLINK": "c:8000", "FEDRAD_SITE": "x"})


# --- Kubernetes -------------------------------------------------------------------------------------------


def k8s_container(file: str, tmp: Path):
    """(args, env, mounts -> folders, read-only mount paths, manifests by kind) of the file's Deployment."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / file).read_text()) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts, read_only = {}, set()
    for m in container["volumeMounts"]:
        folder = tmp / "mounts" / m["name"]
        folder.mkdir(parents=True, exist_ok=True)
        mounts[m["mountPath"]] = folder
        if m.get("readOnly"):
            read_only.add(m["mountPath"])
        if "configMap" in volumes[m["name"]]:  # a ConfigMap volume: one file per key
            wanted = volumes[m["name"]]["configMap"]["name"]
            (cm,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == wanted]
            for key, text in cm["data"].items():
                (folder / key).write_text(text)
    target = container["image"].split(":")[0].removeprefix("fedrad-")
    env = {k: remap(v, mounts) for k, v in image_env(target).items()}
    env.update({e["name"]: remap(e["value"], mounts) for e in container["env"]})
    return container["args"], env, mounts, read_only, by_kind, pod


def test_k8s_site_node_command_and_hardening(tmp_path):
    args_, env, mounts, ro, by_kind, pod = k8s_container("site-node.yaml", tmp_path)
    argv = dry_run(args_, {**base_env(tmp_path), **without_pending(env)})
    args = parse_fedrad(argv)
    # The settings in the mounted config file (ConfigMap) reached the command line.
    assert args.command == "node" and args.superlink == "coordinator.consortium.example.org:8000"
    assert args.site_name == "site-a" and args.certs == str(mounts["/etc/fedrad/certs"])
    assert args.data == str(mounts["/data/dicom"]) and "/data/dicom" in ro and "/etc/fedrad/certs" in ro
    dicom = next(v for v in pod["volumes"] if v["name"] == "dicom")
    assert dicom["persistentVolumeClaim"]["readOnly"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {"fedrad-site-state", "fedrad-site-cache"} <= claims
    assert {p["metadata"]["name"] for p in by_kind["PersistentVolumeClaim"]} == {"fedrad-site-state",
                                                                                 "fedrad-site-cache"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    (policy,) = by_kind["NetworkPolicy"]
    assert policy["spec"]["ingress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ports = sorted(p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert ports == [53, 53, 8000]  # the coordinator's port and DNS, nothing else


def test_k8s_coordinator_command_and_internal_service(tmp_path):
    args_, env, mounts, ro, by_kind, pod = k8s_container("coordinator.yaml", tmp_path)
    args = parse_fedrad(dry_run(args_, {**base_env(tmp_path), **env}))
    assert args.command == "coordinator" and args.port == 8000
    assert args.certs == str(mounts["/etc/fedrad/certs"]) and args.state == str(mounts["/var/lib/fedrad"])
    (service,) = by_kind["Service"]
    # The Control API shares port 8000 in flwr 1.41: never on a public Service.
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]


# --- systemd ----------------------------------------------------------------------------------------------


def systemd_unit(name: str) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    env = dict(v.split("=", 1) for v in keys["Environment"] if not v.startswith("PATH="))
    exec_start = keys["ExecStart"][0].split()
    assert exec_start[0] == "/opt/fedrad/bin/fedrad-entrypoint"
    return exec_start[1:], env, keys


def test_systemd_node_unit_with_example_config_file(tmp_path):
    args_, env, keys = systemd_unit("fedrad-node.service")
    assert keys["ProtectSystem"] == ["strict"] and keys["NoNewPrivileges"] == ["yes"]
    assert keys["Restart"] == ["on-failure"] and keys["User"] == ["fedrad"]
    assert "/var/lib/fedrad" in keys["ReadWritePaths"][0] and "/var/cache/fedrad" in keys["ReadWritePaths"][0]
    config = tmp_path / "fedrad.env"
    config.write_text((DEPLOY / "systemd" / "fedrad-node.env.example").read_text())
    env = {**base_env(tmp_path), **env, "FEDRAD_CONFIG": str(config)}
    certs = tmp_path / "certs"
    certs.mkdir()
    env["FEDRAD_CERTS"] = str(certs)
    pending = [k for k, flag in PENDING_NODE_FLAGS.items() if flag not in node_flags()]
    if pending:  # the example sets FEDRAD_CONSORTIUM_KEY: on a fedrad without the flag the start is refused
        proc = entrypoint(args_, {**env, "FEDRAD_DRY_RUN": "1"})
        assert proc.returncode == 2 and "--consortium-key" in proc.stderr
        config.write_text("\n".join(line for line in config.read_text().splitlines()
                                    if not line.startswith(tuple(pending))) + "\n")
    args = parse_fedrad(dry_run(args_, env))
    assert args.data == "/srv/fedrad/dicom" and args.site_name == "site-a"
    assert args.cache == "/var/cache/fedrad" and args.audit_dir == "/var/lib/fedrad/state/audit"
    assert "/srv/fedrad/dicom" in keys["ReadOnlyPaths"][0]


def test_systemd_coordinator_unit(tmp_path):
    args_, env, keys = systemd_unit("fedrad-coordinator.service")
    certs = tmp_path / "certs"
    certs.mkdir()
    args = parse_fedrad(dry_run(args_, {**base_env(tmp_path), **env, "FEDRAD_CERTS": str(certs)}))
    assert args.command == "coordinator" and args.certs == str(certs) and args.state == "/var/lib/fedrad"


# --- the entrypoint's refusals: one line, exit 2 ----------------------------------------------------------


@pytest.mark.parametrize("role, env, says", [
    ("node", {"FEDRAD_SUPERLINK": "c:8000"}, "FEDRAD_CERTS is not set"),
    ("coordinator", {}, "FEDRAD_CERTS is not set"),
    ("node", {"FEDRAD_CERTS": "/", "FEDRAD_SUPERLINK": "c:8000"}, "FEDRAD_SITE is not set"),
    ("node", {"FEDRAD_INSECURE": "1"}, "FEDRAD_SUPERLINK is not set"),
    ("node", {"FEDRAD_CERTS": "/nonexistent-certs", "FEDRAD_SUPERLINK": "c:8000"}, "no such folder"),
    ("register", {"FEDRAD_CERTS": "/", "FEDRAD_SUPERLINK": "c:8000"}, "no public keys"),
    ("", {}, "no role"),
])
def test_entrypoint_refuses_with_one_line(tmp_path, role, env, says):
    proc = entrypoint([role] if role else [], {**base_env(tmp_path), **env, "FEDRAD_DRY_RUN": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_entrypoint_config_file_is_data_and_environment_wins(tmp_path):
    env = base_env(tmp_path)
    config = tmp_path / "fedrad.env"
    config.write_text("# site settings\nFEDRAD_INSECURE=1\nFEDRAD_PORT=9\nFEDRAD_HOST=$(touch pwned)\n")
    argv = dry_run(["coordinator"], {**env, "FEDRAD_CONFIG": str(config), "FEDRAD_PORT": "7000"})
    args = parse_fedrad(argv)
    assert args.port == 7000 and args.host == "$(touch pwned)" and args.certs is None
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    config.write_text("PATH=/evil\n")
    proc = entrypoint(["coordinator"], {**env, "FEDRAD_CONFIG": str(config)})
    assert proc.returncode == 2 and "line 1" in proc.stderr and "PATH" in proc.stderr
    proc = entrypoint(["coordinator"], {**env, "FEDRAD_CONFIG": str(tmp_path / "missing.env")})
    assert proc.returncode == 2 and "missing.env" in proc.stderr


def test_entrypoint_policy_setting_never_silently_dropped(tmp_path):
    env = {**base_env(tmp_path), "FEDRAD_INSECURE": "1", "FEDRAD_SUPERLINK": "127.0.0.1:1",
           "FEDRAD_POLICY": str(tmp_path / "policy.toml"), "FEDRAD_DRY_RUN": "1"}
    proc = entrypoint(["node"], env)
    if "--policy" in node_flags():
        assert proc.returncode == 0 and str(tmp_path / "policy.toml") in proc.stdout.splitlines()
    else:
        assert proc.returncode == 2 and "--policy" in proc.stderr


def test_entrypoint_passes_other_commands_to_fedrad(tmp_path):
    assert dry_run(["scan", "/data/dicom", "--quiet"], base_env(tmp_path)) == ["fedrad", "scan", "/data/dicom",
                                                                               "--quiet"]
    proc = entrypoint(["--version"], base_env(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith("fedrad ")


def test_image_targets_match_compose_and_k8s():
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", dockerfile, flags=re.M)
    assert stages[-2:] == ["coordinator", "node"]
    for stage in ("coordinator", "node"):
        body = dockerfile.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "HEALTHCHECK" in body and f'CMD ["{stage}"]' in body
    runtime = dockerfile.split(" AS runtime\n", 1)[1]
    assert "USER 10001:10001" in runtime and "org.opencontainers.image.licenses" in runtime
    assert "apt-get install" not in runtime and "pip install" not in runtime


# --- the compose consortium's commands, run for real (outside containers) --------------------------------


@pytest.mark.slow
def test_compose_consortium_commands_start_tls_coordinator_and_register_nodes(tmp_path):
    """init -> coordinator -> register -> three site nodes, each as compose.yaml runs it; the nodes are online."""
    from fedrad.deploy.processes import ProcessGroup, free_port, wait_for_port
    from fedrad.deploy.run_command import write_flwr_home

    port = free_port()
    listen = f"127.0.0.1:{port}"

    def service(name: str) -> tuple[list[str], dict[str, str]]:
        cmd, env, _, _ = compose_service("compose.yaml", name, tmp_path)  # one folder per named volume
        # Here the coordinator listens on loopback at a free port instead of the container network's 8000.
        env = {k: v.replace("coordinator:8000", listen) for k, v in without_pending(env).items()}
        return cmd, {**base_env(tmp_path), **env}

    cmd, env = service("init")
    proc = entrypoint(cmd, env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    consortium = tmp_path / "volumes" / "consortium"
    assert (consortium / "certs" / "ca.pem").exists() and (consortium / "certs" / "consortium.pub").exists()
    for site in ("site-a", "site-b", "site-c"):  # DICOM files (any names) and the site's labels
        assert len([p for p in (consortium / "sites" / site).rglob("*") if p.is_file()]) > 10, site
    ca_before = (consortium / "certs" / "ca.pem").read_bytes()
    assert entrypoint(cmd, env).returncode == 0  # a second `up` keeps the consortium
    assert (consortium / "certs" / "ca.pem").read_bytes() == ca_before

    with ProcessGroup() as group:
        cmd, env = service("coordinator")
        link = group.start("coordinator", [str(ENTRYPOINT), *cmd],
                           tmp_path / "logs" / "coordinator.log",
                           env={**env, "FEDRAD_HOST": "127.0.0.1", "FEDRAD_PORT": str(port)})
        wait_for_port("127.0.0.1", port, 60, link)
        health = entrypoint(["healthcheck"], {**env, "FEDRAD_PORT": str(port)})
        assert health.returncode == 0, health.stderr

        cmd, env = service("register")
        proc = entrypoint(cmd, env, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        threads = {"OMP_NUM_THREADS": "1"}
        node_ports = {}
        for site in ("site-a", "site-b", "site-c"):
            cmd, env = service(site)
            node_ports[site] = free_port()
            group.start(site, [str(ENTRYPOINT), *cmd], tmp_path / "logs" / f"{site}.log",
                        env={**env, **threads, "FEDRAD_NODE_PORT": str(node_ports[site])})

        home = write_flwr_home(tmp_path / "flwr-home", listen, consortium / "certs" / "ca.pem")
        online: list = []
        deadline = time.time() + 120
        while time.time() < deadline:
            for name, p in group.procs:
                assert p.poll() is None, f"{name} exited: " + (tmp_path / "logs" / f"{name}.log").read_text()[-2000:]
            out = subprocess.run([str(BIN / "flwr"), "supernode", "list", "fedrad", "--format", "json"],
                                 env={**os.environ, "FLWR_HOME": str(home)}, capture_output=True, text=True,
                                 timeout=60)
            if out.returncode == 0:
                nodes = json.loads(out.stdout).get("nodes", [])
                online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
                if len(online) == 3:
                    break
            time.sleep(3)
        assert len(online) == 3, out.stdout + out.stderr
        for site, node_port in node_ports.items():
            cmd, env = service(site)
            health = entrypoint(["healthcheck"], {**env, "FEDRAD_NODE_PORT": str(node_port)})
            assert health.returncode == 0, (site, health.stderr)
    assert link.poll() is not None


# --- the same consortium in real containers, where a container engine can run them (opt-in) -------------

ENGINE = os.environ.get("FEDRAD_TEST_CONTAINER_ENGINE", "")  # e.g. "podman --runtime runc" (deploy/README.md)
IMAGES = os.environ.get("FEDRAD_TEST_IMAGE_TAG", "0.1.0")


@pytest.mark.slow
@pytest.mark.skipif(not ENGINE, reason="set FEDRAD_TEST_CONTAINER_ENGINE to run the images (no engine in CI)")
def test_containers_run_one_round(tmp_path):
    """init, coordinator, register and three nodes as containers (compose's settings), then one signed round."""
    import shlex

    from fedrad.deploy.processes import free_port, wait_for_port
    from fedrad.deploy.run_command import submit_run

    engine = shlex.split(ENGINE)
    port = free_port()
    listen = f"127.0.0.1:{port}"
    names: list[str] = []
    # Host network: these sandboxes cannot make container networks; the coordinator listens on loopback.
    limits = ["--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]

    def container(name: str, target: str, detach: bool, extra: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd, _, folders, ro = compose_service("compose.yaml", name, tmp_path)
        service = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())["services"][name]
        env = {k: str(v).replace("coordinator:8000", listen) for k, v in service.get("environment", {}).items()}
        if "--consortium-key" not in node_flags():
            env.pop("FEDRAD_CONSORTIUM_KEY", None)
        mounts = []
        for path, folder in folders.items():  # each named volume: a folder owned by the image's user
            if path != "/tmp":
                os.chown(folder, 10001, 10001)
                mounts += ["-v", f"{folder}:{path}" + (":ro" if path in ro else "")]
        names.append(f"fedrad-test-{name}-{port}")
        args = [*engine, "run", "--name", names[-1], "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", *limits, *mounts, *(extra or [])]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        args += ["-d"] if detach else ["--rm"]
        return subprocess.run([*args, f"localhost/fedrad-{target}:{IMAGES}", *cmd], capture_output=True, text=True,
                              timeout=300)

    try:
        proc = container("init", "node", detach=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = container("coordinator", "coordinator", True,
                         ["-e", "FEDRAD_HOST=127.0.0.1", "-e", f"FEDRAD_PORT={port}"])
        assert proc.returncode == 0, proc.stderr
        wait_for_port("127.0.0.1", port, 90)
        proc = container("register", "node", detach=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for site in ("site-a", "site-b", "site-c"):
            proc = container(site, "node", True, ["-e", f"FEDRAD_NODE_PORT={free_port()}", "-e", "OMP_NUM_THREADS=1"])
            assert proc.returncode == 0, proc.stderr
        # The ServerApp runs inside the coordinator container: the run directory is in its state volume.
        run_dir = tmp_path / "volumes" / "coordinator_state" / "runs" / "test"
        overrides = {"num-server-rounds": 1, "objective": "simclr", "image-size": 32, "local-steps": 2,
                     "batch-size": 8, "min-train-nodes": 3, "min-available-nodes": 3,
                     "run-dir": "/var/lib/fedrad/runs/test"}
        ca = tmp_path / "volumes" / "consortium" / "certs" / "ca.pem"
        key = tmp_path / "volumes" / "consortium" / "certs" / "consortium.key"  # written by the init job
        code = submit_run(listen, overrides, ca_cert=ca, timeout=600, echo=False, sign_key=key)
        assert code == 0 and (run_dir / "summary.json").exists()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 1
    finally:
        for name in names:
            subprocess.run([*engine, "rm", "-f", name], capture_output=True, timeout=60)

