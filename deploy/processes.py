"""Start and stop the real Flower processes: SuperLink (coordinator), SuperNodes (sites), `flwr run`.

Everything started here is tracked in a `ProcessGroup` that stops its processes (their whole process
groups, so Flower's own children such as flower-superexec and flwr-clientapp go too) on exit, on
Ctrl-C and on failure: nothing is left behind.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedrad.client.runtime import SiteTrust

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
        atexit.register(self.stop)

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log_path, "ab")
        self._logs.append(log_fh)
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env or flower_env(),
                                cwd=cwd, start_new_session=True)
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
    cmd = [tool("flower-superlink"), "--disable-runtime-dependency-installation",
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
    """The command that starts a site: fedrad's runtime (client/runtime.py), which runs the SuperNode.

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
    return [sys.executable, "-I", "-u", "-m", "fedrad.client.runtime", "serve", "--port", str(port),
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
    """The Flower app folder: fedrad's project root (its pyproject.toml is the app config)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and "tool" in (data := tomllib.loads(pyproject.read_text())) and "flwr" in data["tool"]:
        return root
    raise FileNotFoundError(
        f"no Flower app config at {pyproject}: install fedrad from its source folder (pip install -e .)")


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings -> typed values (TOML if it parses, else a plain string)."""
    out: dict[str, object] = {}
    for item in items:
        for part in item.split():
            if "=" not in part:
                raise ValueError(f"run-config override '{part}' is not KEY=VALUE")
            key, raw = part.split("=", 1)
            try:
                out[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = raw
    return out


def write_flwr_home(home: Path, address: str, ca_cert: Path | None = None) -> Path:
    """A private FLWR_HOME whose config.toml names the coordinator's Control API as connection 'fedrad'."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fedrad"', "", "[superlink.fedrad]", f"address = {json.dumps(address)}"]
    if ca_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(ca_cert))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def run_config_string(overrides: dict[str, object], app: Path, sign_key: Path | None = None) -> str:
    """The `--run-config` string for `flwr run`; with `sign_key`, plus the consortium's `run-signature`.

    The signature covers the FAB `flwr run` will build from `app` (Flower's build is byte-deterministic)
    and the run-config the sites will fuse from it and these overrides, as Flower itself parses them.
    """
    text = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    if sign_key is None:
        return text
    from flwr.common.config import parse_config_args

    from fedrad.common.run_signature import SIGNATURE_KEY
    from fedrad.server.run_signing import build_fab, load_signing_key, sign_run

    key = load_signing_key(sign_key)  # a missing or wrong key fails before the FAB is built
    signature = sign_run(build_fab(app), parse_config_args([text]) if text else {}, key)
    return f"{text} {SIGNATURE_KEY}={toml_value(signature)}".strip()


def submit_run(superlink: str, overrides: dict[str, object], log_path: Path | None = None,
               ca_cert: Path | None = None, timeout: float | None = None, app: Path | None = None,
               echo: bool = True, sign_key: Path | None = None) -> int:
    """`flwr run <fedrad app> fedrad --stream` with overrides (signed with `sign_key` when given).

    Returns flwr's exit code. The output streams to this terminal (and to `log_path` when given) so an
    operator watches the rounds.
    """
    app = Path(app or app_dir())
    config_text = run_config_string(overrides, app, sign_key)
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca_cert)
    cmd = [tool("flwr"), "run", str(app), "fedrad", "--stream"]
    if config_text:
        cmd += ["--run-config", config_text]
    env = flower_env({"FLWR_HOME": str(home)})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    log_fh = open(log_path, "a", encoding="utf-8") if log_path else None
    # A watchdog, because a stalled run prints nothing that a line-by-line check could notice.
    watchdog = threading.Timer(timeout, _kill_group, args=(proc,)) if timeout else None
    if watchdog:
        watchdog.start()
    run_id: int | None = None
    keep_home = False
    try:
        assert proc.stdout is not None
        boxed = FlowerBox()
        for line in proc.stdout:
            if log_fh:
                log_fh.write(line)
                log_fh.flush()
            if run_id is None and (started := _STARTED.search(line)):
                run_id = int(started.group(1))
            if not echo:
                continue
            if boxed.feed(line):
                if boxed.message:
                    print(f"fedrad run: flwr: {boxed.message}", file=sys.stderr, flush=True)
            elif _worth_showing(line):
                print(line.rstrip(), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        # flwr runs in its own session, so Ctrl-C reached only us: the run goes on at the coordinator
        # unless it is stopped there, with this same Flower config (it names the coordinator and its CA).
        keep_home = not stop_run(home, run_id)
        raise
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.poll() is None:
            _kill_group(proc)
        if log_fh:
            log_fh.close()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


_STARTED = re.compile(r"Successfully started run (\d+)")


def stop_run(home: Path, run_id: int | None, timeout: float = 60.0) -> bool:
    """`flwr stop RUN_ID` at the coordinator named in FLWR_HOME `home`; says on stderr what happened.

    False when the run may still be going (the caller keeps `home` so the operator can stop it by hand).
    """
    by_hand = f"FLWR_HOME={home} flwr ls fedrad; FLWR_HOME={home} flwr stop RUN_ID fedrad"
    if run_id is None:
        print(f"fedrad run: interrupted before the coordinator confirmed a run id; to check: {by_hand}",
              file=sys.stderr, flush=True)
        return False
    print(f"fedrad run: interrupted: stopping run {run_id} on the coordinator ...", file=sys.stderr, flush=True)
    try:
        out = subprocess.run([tool("flwr"), "stop", str(run_id), "fedrad"], capture_output=True, text=True,
                             env=flower_env({"FLWR_HOME": str(home)}), timeout=timeout, start_new_session=True)
        ok = out.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if ok:
        print(f"fedrad run: run {run_id} stopped on the coordinator", file=sys.stderr, flush=True)
    else:
        print(f"fedrad run: could not stop run {run_id}; stop it with: {by_hand.replace('RUN_ID', str(run_id))}",
              file=sys.stderr, flush=True)
    return ok


def _kill_group(proc: subprocess.Popen) -> None:
    _signal_tree(proc.pid, signal.SIGKILL)


def _worth_showing(line: str) -> bool:
    """Keep the operator's terminal readable: fedrad's own progress lines, Flower's warnings and errors."""
    return any(word in line for word in ("fedrad", "ERROR", "WARNING", "Error", "error", "unavailable",
                                         "Successfully", "failed", "Failed", "denied", "refused"))


_BOX_EDGES = "╭│╰"


class FlowerBox:
    """Folds one of `flwr`'s rich panels (its errors: ╭─ Error ─╮ │ text │ ╰─╯) into one line.

    `feed(line)` says whether the line belonged to a panel; after the closing edge, `message` holds the
    panel's title and text joined by spaces ("" until then).
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._open = False
        self.message = ""

    def feed(self, line: str) -> bool:
        text = line.strip()
        self.message = ""
        if not text or text[0] not in _BOX_EDGES:
            return False
        inner = text.strip("╭╮╰╯│─ ")
        if text[0] == "╭":
            self._parts, self._open = ([inner] if inner else []), True
        elif text[0] == "│" and self._open:
            if inner:
                self._parts.append(inner)
        elif text[0] == "╰":
            title, *body = self._parts or [""]
            joined = " ".join(body)
            self.message = f"{title}: {joined}" if title and body else (title or joined)
            self._parts, self._open = [], False
        return True


# --- CLI handlers ----------------------------------------------------------------------------------


def _tls_from(certs: str | None, site: str | None = None) -> TlsFiles | None:
    """The coordinator's TLS files (`site=None`) from a `fedrad certs init` folder."""
    if not certs:
        return None
    from fedrad.deploy.certs import tls_files

    return tls_files(Path(certs), site)


def _node_tls_from(certs: str | None, site: str | None) -> TlsFiles | None:
    """A site's TLS files: its own folder (`fedrad-certs/sites/site-a`: ca.pem + node.key, the site's name is
    the folder's), or the consortium folder plus `--site-name`."""
    if not certs:
        return None
    folder = Path(certs).resolve()
    if site is None:
        if not (folder / "node.key").exists():
            raise FileNotFoundError(f"--certs {folder}: no node.key here; give the site's own folder "
                                    "(e.g. fedrad-certs/sites/site-a) or add --site-name")
        site = folder.name
    return _tls_from(certs, site)


def _ca_from(certs: str | None) -> Path | None:
    """The consortium CA that `fedrad run` trusts: `ca.pem` in the --certs folder (no private key needed)."""
    if not certs:
        return None
    ca = Path(certs).resolve() / "ca.pem"
    if not ca.exists():
        raise FileNotFoundError(f"--certs: {ca} does not exist (the consortium CA from `fedrad certs init`)")
    return ca


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


def app_run_config(app: Path | None = None) -> dict[str, object]:
    """The app's run-config defaults: `[tool.flwr.app.config]` of its pyproject.toml, as Flower reads them."""
    pyproject = Path(app or app_dir()) / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def validate_run_config(overrides: dict[str, object], app: Path | None = None) -> None:
    """Refuse a run-config the ServerApp would refuse, before anything is submitted (ValueError names the key).

    The same checks as the ServerApp: the app's defaults fused with the overrides, `RunConfig.from_flower`,
    then the privacy settings.
    """
    from fedrad.common.run_config import RunConfig
    from fedrad.server.privacy import check_privacy_config

    config = app_run_config(app)
    config.update(overrides)
    check_privacy_config(RunConfig.from_flower(config))


def cmd_coordinator(args) -> int:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    tls = _tls_from(args.certs)
    cmd = superlink_command(state, args.host, args.port, tls, node_auth=tls is not None)
    print(f"fedrad coordinator: SuperLink on {args.host}:{args.port} "
          f"({'TLS + node authentication' if tls else 'insecure, loopback/trusted network only'}); "
          f"state in {state}. Ctrl-C stops it.", flush=True)
    return _run_foreground(cmd, flower_env())


def node_location(args) -> tuple[str | Path, str | None, dict[str, str], dict]:
    """(data-dir value, cache-dir, source-* node-config keys, extra scan_folder kwargs) for `fedrad node`:
    a folder, or a PACS URL whose query and limits travel as site-local node config (no secret, only where
    the secret is)."""
    source, cache, source_config, scan_kw = getattr(args, "source", None), args.cache, {}, {}
    if source:  # a PACS: node config data-dir holds its URL, source-* its query and limits (site-local)
        from fedrad.client.scan import source_options_from_args
        from fedrad.common.sources.pacs import default_source_cache_dir, is_source_url

        if args.data or not is_source_url(source):
            raise ValueError("--source: give dicomweb+https://HOST/PATH or dimse://AET@HOST:PORT, without --data")
        options = source_options_from_args(args)
        cache = cache or str(default_source_cache_dir(source))
        data, source_config, scan_kw = source, options.to_config(), {"source_options": options, "cache_dir": cache}
    else:
        if not args.data:
            raise ValueError("give --data FOLDER or --source URL")
        data = Path(args.data).resolve()
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder")
    return data, cache, source_config, scan_kw


def cmd_node(args) -> int:
    data, cache, source_config, scan_kw = node_location(args)
    trust = SiteTrust(
        consortium_key=Path(args.consortium_key).resolve() if args.consortium_key else None,
        allow_unsigned=args.allow_unsigned,
        client_app=args.client_app,
        client_app_dir=Path(args.client_app_dir).resolve() if args.client_app_dir else None)
    if trust.consortium_key is None and not trust.allow_unsigned:
        raise ValueError("--consortium-key is required (the consortium's public key, e.g. consortium.pub): this "
                         "node runs only what the consortium signed (--allow-unsigned: local experiments only)")
    if trust.consortium_key is not None:
        from fedrad.common.keys import load_public_key

        load_public_key(trust.consortium_key)  # KeyFileError (a ValueError) names the file
    args.superlink = with_default_port(args.superlink)
    if not args.certs and not args.insecure and not is_loopback(args.superlink):
        raise ValueError(f"--superlink {args.superlink} is not on this machine and --certs is not given: "
                         "give the site folder from `fedrad certs init` (TLS), or --insecure to send in plaintext")
    if not args.no_scan:
        from fedrad.client.scan import scan_folder

        print(f"fedrad node: scanning {data} to show what this site would train on ...", flush=True)
        report = scan_folder(data, decode=False, progress=True, **scan_kw)
        usable = report["usable"]
        if "pull" in report:
            p = report["pull"]
            print(f"fedrad node: fetched {p['fetched']} instances from the PACS in {p['fetch_seconds']:.1f} s "
                  f"({p['pending']} left for the next pull)", flush=True)
        print(f"fedrad node: {usable} usable images. Only model weights and aggregate numbers will leave "
              f"this machine; images and headers stay here.", flush=True)
    from fedrad.client.policy import check_coordinator_ca, default_policy, load_policy
    from fedrad.client.site_state import node_state_config

    policy = load_policy(args.policy) if args.policy else default_policy()  # bad file: one line, exit 2
    node_config = {"data-dir": str(data), "cache-dir": cache, "device": args.device,
                   "labels": args.labels, "policy": str(Path(args.policy).resolve()) if args.policy else None,
                   **node_state_config(args.state_dir, data, cache, getattr(args, "audit_dir", None)),
                   **source_config}
    tls = _node_tls_from(args.certs, args.site_name)
    check_coordinator_ca(policy, tls.ca_cert if tls else None)
    print(f"fedrad node: site policy {policy.source}; state (salt, DP ledger) in {node_config['state-dir']}; "
          f"audit in {node_config['audit-dir']}", flush=True)
    cmd = supernode_command(args.superlink, args.port, node_config, tls, trust, args.log_level)
    signed_by = f"runs signed by {trust.consortium_key}" if trust.consortium_key else "UNSIGNED runs too"
    print(f"fedrad node: joining the coordinator at {args.superlink} "
          f"({'TLS' if tls else 'plaintext'}); running {trust.client_app} for {signed_by}. Ctrl-C leaves.",
          flush=True)
    return _run_foreground(cmd, flower_env())


def cmd_run(args) -> int:
    overrides = parse_overrides(args.config)
    superlink = with_default_port(args.superlink)
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / "run.json").exists():
            raise FileNotFoundError(f"--resume {run_dir}: not a fedrad run directory (no run.json)")
        # The original run's config, then any new overrides (e.g. a new timeout).
        original = json.loads((run_dir / "run.json").read_text())["config"]
        # The old signature covered the old config; the resumed run is signed afresh (--sign-key).
        merged = {k: v for k, v in original.items() if k not in ("resume", "run-dir", "run-signature")}
        merged.update(overrides)
        overrides = merged
        overrides["resume"] = True
    else:
        run_dir = Path(args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    overrides["run-dir"] = str(run_dir)
    validate_run_config(overrides)  # a bad -c value: one line naming the key, exit 2, nothing submitted
    ca = _ca_from(args.certs)
    sign_key = Path(args.sign_key).resolve() if args.sign_key else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if sign_key is None:
        print("fedrad run: warning: unsigned run (no --sign-key): sites refuse it unless started with "
              "--allow-unsigned", file=sys.stderr, flush=True)
    print(f"fedrad run: submitting to {superlink}; run directory {run_dir}", flush=True)
    code = submit_run(superlink, overrides, log_path=run_dir / "flwr-run.log", ca_cert=ca, sign_key=sign_key)
    return report_run(run_dir, code)


def report_run(run_dir: Path, flwr_code: int) -> int:
    """Exit status from what the run left behind: flwr's own exit code says little about the ServerApp."""
    from fedrad.server.checkpoint import latest_checkpoint

    summary = run_dir / "summary.json"
    if flwr_code == 0 and summary.exists():
        s = json.loads(summary.read_text())
        print(f"fedrad run: finished {s['rounds']} rounds; global weights {run_dir / s['global_weights']}")
        return 0
    advice = (f" Continue it with: fedrad run --resume {run_dir}" if latest_checkpoint(run_dir) is not None
              else " No round finished, so there is nothing to resume.")
    print(f"fedrad run: the run did not finish (flwr exit {flwr_code}); see {run_dir / 'flwr-run.log'}.{advice}",
          file=sys.stderr)
    return 1


def _run_foreground(cmd: list[str], env: dict[str, str]) -> int:
    """Run a long-lived Flower process in the foreground; Ctrl-C/SIGTERM stop it and its children."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

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
