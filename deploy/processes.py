"""Start and stop the real Flower processes: SuperLink (coordinator), SuperNodes (sites), `flwr run`.

Everything started here is tracked in a `ProcessGroup` that stops its processes (their whole process
groups, so Flower's own children such as flower-superexec and flwr-clientapp go too) on exit, on
Ctrl-C and on failure: nothing is left behind.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedrad.client.runtime.log_lines import copy_plain
from fedrad.client.runtime.site_runtime import RUNTIME_MODULE, SiteTrust
from fedrad.common.log_rotation import RotatingLog

DEFAULT_PORT = 8000  # flwr 1.41 SuperLink: Fleet, Control and Runtime APIs share one HTTP port


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update check, this venv's tools on PATH."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def tool(name: str) -> str:
    """Path of a Flower executable installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found: is flwr installed in this environment?")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0] if proc.args else ''} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class ProcessGroup:
    """Owns every process it starts and stops all of them, however the program ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []
        self._pumps: list[threading.Thread] = []
        atexit.register(self.stop)

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start `cmd`; its output goes to `log_path` as plain text (Flower colours whatever it writes to).

        The process writes to a pipe that a pump thread copies into a `RotatingLog`: the log file stays bounded
        however long the process runs (FEDRAD_LOG_MAX_BYTES x FEDRAD_LOG_KEEP; fedrad.common.log_rotation)."""
        log_fh = RotatingLog(log_path)
        self._logs.append(log_fh)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or flower_env(),
                                cwd=cwd, start_new_session=True, text=True, encoding="utf-8", errors="replace")
        pump = threading.Thread(target=copy_plain, args=(proc.stdout, log_fh), name=f"log-{name}", daemon=True)
        pump.start()
        self._pumps.append(pump)
        self.procs.append((name, proc))
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process, its group and every descendant (tests crash a node or the coordinator)."""
        _signal_tree(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace: float = 5.0) -> None:
        # Flower's children (flower-superexec, flwr-serverapp, flwr-clientapp) may start sessions of their
        # own, so a process-group kill alone can miss them: collect all descendants first.
        family = {pid for _, proc in self.procs for pid in _descendants(proc.pid)}
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:
            # SIGKILL the group even if the leader exited: its children (flwr-clientapp) may linger.
            _signal_tree(proc.pid, signal.SIGKILL)
        for pid in family:
            _kill_pid(pid, signal.SIGKILL)
        self.procs.clear()
        for pump in self._pumps:  # the last lines reach the log file before it is closed
            pump.join(timeout=grace)
        self._pumps.clear()
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _descendants(root: int) -> list[int]:
    """All live descendants of `root` (psutil: portable, and it handles processes vanishing mid-walk)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return []


def _kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_tree(pid: int, sig: int) -> None:
    family = _descendants(pid)
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    _kill_pid(pid, sig)
    for child in family:
        _kill_pid(child, sig)


@dataclass
class TlsFiles:
    """Paths from `fedrad certs init` (see fedrad.deploy.certs)."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None
    node_private_key: Path | None = None
    node_public_key: Path | None = None


def superlink_command(state_dir: Path, host: str, port: int, tls: TlsFiles | None = None,
                      node_auth: bool = False) -> list[str]:
    # Flower's flower-superlink through fedrad.deploy.superlink_entry: the same entry point, a longer SQLite lock wait
    cmd = [sys.executable, "-m", "fedrad.deploy.superlink_entry", "--disable-runtime-dependency-installation",
           "--database", str(state_dir / "superlink.db"), "--host", host, "--port", str(port)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    return cmd


def toml_value(value: object) -> str:
    """A node-config / run-config value as Flower's parser wants it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' in text:
        raise ValueError(f"value {text!r} may not contain a double quote")
    return json.dumps(text)


def node_config_string(config: dict[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items() if v not in (None, ""))


def supernode_command(superlink: str, port: int, node_config: dict[str, object],
                      tls: TlsFiles | None = None, trust: SiteTrust | None = None,
                      log_level: str = "INFO") -> list[str]:
    """The command that starts a site: fedrad's runtime (client/runtime/site_runtime.py), which runs the SuperNode.

    The SuperNode runs with process isolation: it never installs or imports the run's FAB; the runtime
    answers each message with the ClientApp installed here, for runs the consortium signed (`trust`).
    `port` is the SuperNode's Runtime API port on 127.0.0.1 (unique per node on one machine).
    """
    trust = trust or SiteTrust()
    node = [tool("flower-supernode"), "--superlink", superlink, "--node-config", node_config_string(node_config)]
    if tls is None:
        node.append("--insecure")
    else:
        node += ["--root-certificates", str(tls.ca_cert)]
        if tls.node_private_key:
            # flwr 1.41 derives the public key from the private one (--auth-supernode-public-key is deprecated)
            node += ["--auth-supernode-private-key", str(tls.node_private_key)]
    # -I: the runtime imports nothing from the working directory or PYTHON* variables.
    return [sys.executable, "-I", "-u", "-m", RUNTIME_MODULE, "serve", "--port", str(port),
            "--log-level", log_level, *trust.args(), "--", *node]


def is_loopback(address: str) -> bool:
    """True when HOST:PORT names this machine (127.0.0.0/8, ::1, localhost): plaintext never leaves it."""
    import ipaddress

    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_dir() -> Path:
    """The Flower app folder. In a checkout: fedrad's project root (its pyproject.toml is the app config).
    Installed from a wheel: a folder built once per process from the installed package (see `_installed_app`)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and "tool" in (data := tomllib.loads(pyproject.read_text())) and "flwr" in data["tool"]:
        return root
    if (root / APP_CONFIG).exists():
        return _installed_app(root)
    raise FileNotFoundError(
        f"no Flower app config at {pyproject} or {root / APP_CONFIG}: reinstall fedrad (pip install fedrad-*.whl)")


APP_CONFIG = "flower_app.toml"  # the project's pyproject.toml, shipped in the wheel by setup.py
APP_README = "flower_app_README.md"


@functools.cache
def _installed_app(package: Path) -> Path:
    """The layout `flwr run` and the FAB expect (pyproject.toml, README.md, common/ client/ server/ sources),
    copied from the installed `fedrad` package into a temporary folder removed at exit.

    Same wheel -> same bytes -> the same FAB, so run signing is deterministic (Flower's builder fixes dates
    and sorts entries). Only .py sources and the two text files are copied: what fab-include names.
    """
    folder = Path(tempfile.mkdtemp(prefix="fedrad-app-"))
    atexit.register(shutil.rmtree, folder, True)
    shutil.copyfile(package / APP_CONFIG, folder / "pyproject.toml")
    if (package / APP_README).exists():
        shutil.copyfile(package / APP_README, folder / "README.md")
    for layer in ("common", "client", "server"):
        for source in sorted((package / layer).rglob("*.py")):
            target = folder / layer / source.relative_to(package / layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return folder


def with_default_port(address: str, port: int = DEFAULT_PORT) -> str:
    """`host` -> `host:8000` (IPv6 too: `::1` -> `[::1]:8000`); an address with a port is kept."""
    address = address.strip()
    if not address:
        raise ValueError("--superlink is empty: give HOST or HOST:PORT")
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{port}"
    colons = address.count(":")
    if colons == 0:
        return f"{address}:{port}"
    if colons == 1:
        host, _, raw = address.partition(":")
        if not host or not raw.isdigit() or not 0 < int(raw) < 65536:
            raise ValueError(f"--superlink {address}: expected HOST:PORT with a port in 1-65535")
        return address
    return f"[{address}]:{port}"  # a bare IPv6 address


def _watched(stream, watch: Callable[[str], object]):
    """Each line of `stream`, shown to `watch` before it is copied."""
    for line in stream:
        watch(line)
        yield line


def _run_foreground(cmd: list[str], env: dict[str, str], watch: Callable[[str], object] | None = None) -> int:
    """Run a long-lived Flower process in the foreground; Ctrl-C/SIGTERM stop it and its children.

    Its output keeps Flower's colours on a terminal; redirected (a log file, systemd, a container) it is
    plain text. `watch` sees every output line (then the output is plain text on a terminal too).
    """
    plain = watch is not None or not sys.stdout.isatty()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE if plain else None,
                            stderr=subprocess.STDOUT if plain else None, text=plain or None,
                            encoding="utf-8" if plain else None, errors="replace" if plain else None)
    lines = proc.stdout if watch is None else _watched(proc.stdout, watch)
    pump = threading.Thread(target=copy_plain, args=(lines, sys.stdout), daemon=True) if plain else None
    if pump:
        pump.start()

    def forward(signum, _frame):
        _signal_tree(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return 130
    finally:
        _signal_tree(proc.pid, signal.SIGKILL)
        if pump:
            pump.join(timeout=5)  # its last lines
