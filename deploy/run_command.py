"""`fedrad run`: validate a run-config locally, sign it, submit it with `flwr run`, follow it, stop it on
Ctrl-C, and say in one line why it failed (Flower's own reason), offering `--resume` only when a checkpoint exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from fedrad.client.runtime.log_lines import ANSI
from fedrad.common.log_rotation import RotatingLog
from fedrad.common.toml_lines import key_line
from fedrad.deploy.flower_cli import RUN_FAILED_EXIT, CoordinatorError, FlowerBox, ca_from, flwr_json, write_flwr_home
from fedrad.deploy.processes import (
    _signal_tree,
    app_dir,
    flower_env,
    toml_value,
    tool,
    with_default_port,
)


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`-c` values -> typed run-config values: `KEY=VALUE` (TOML if it parses, else a plain string), or a TOML
    file of `key = value` lines (as `flwr run --run-config FILE` takes; later `-c` values win)."""
    out: dict[str, object] = {}
    for item in items:
        if item.endswith(".toml") and "=" not in item:
            out.update(read_run_config_file(Path(item)))
            continue
        for part in item.split():
            if "=" not in part:
                raise ValueError(f"run-config override '{part}' is not KEY=VALUE (or a .toml file)")
            key, raw = part.split("=", 1)
            try:
                out[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = raw
    return out


def read_run_config_file(path: Path) -> dict[str, object]:
    """A run-config TOML file: flat `key = value` pairs (no tables); errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"-c {path}: cannot read the run-config file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    for key, value in data.items():
        if isinstance(value, dict | list):
            raise ValueError(f"{path}:{config_line(text, key)}: '{key}' must be a single value (a run-config file "
                             "holds flat key = value lines)")
    return dict(data)


def config_line(text: str, key: str) -> int:
    """1-based line where top-level `key` is set in a TOML text (0 when it is not)."""
    return key_line(text, key)


def validate_with_lines(overrides: dict[str, object], files: list[Path]) -> None:
    """`validate_run_config`, with the file and line of the offending key when it came from a -c TOML file."""
    try:
        validate_run_config(overrides)
    except ValueError as exc:
        message = str(exc)
        for path in files:
            text = path.read_text(encoding="utf-8")
            for key in tomllib.loads(text):
                if key in message and config_line(text, key):
                    raise ValueError(f"{path}:{config_line(text, key)}: {message}") from None
        raise


def run_config_string(overrides: dict[str, object], app: Path, sign_key: Path | None = None,
                      valid_seconds: float | None = None) -> str:
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
    extra = {} if valid_seconds is None else {"valid_seconds": valid_seconds}  # default: DEFAULT_VALID_SECONDS
    signature = sign_run(build_fab(app), parse_config_args([text]) if text else {}, key, **extra)
    return f"{text} {SIGNATURE_KEY}={toml_value(signature)}".strip()


def submit_run(superlink: str, overrides: dict[str, object], log_path: Path | None = None,
               ca_cert: Path | None = None, timeout: float | None = None, app: Path | None = None,
               echo: bool = True, sign_key: Path | None = None, valid_seconds: float | None = None) -> int:
    """`flwr run <fedrad app> fedrad --stream` with overrides (signed with `sign_key` when given).

    Returns flwr's exit code. The output streams to this terminal (and to `log_path` when given) so an
    operator watches the rounds.
    """
    app = Path(app or app_dir())
    config_text = run_config_string(overrides, app, sign_key, valid_seconds)
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca_cert)
    cmd = [tool("flwr"), "run", str(app), "fedrad", "--stream"]
    if config_text:
        cmd += ["--run-config", config_text]
    env = flower_env({"FLWR_HOME": str(home)})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    log_fh = RotatingLog(log_path) if log_path else None  # bounded however long the run streams
    # A watchdog, because a stalled run prints nothing that a line-by-line check could notice.
    watchdog = threading.Timer(timeout, _kill_group, args=(proc,)) if timeout else None
    if watchdog:
        watchdog.start()
    run_id: int | None = None
    keep_home = False
    try:
        assert proc.stdout is not None
        boxed = FlowerBox()
        colour_ok = sys.stdout.isatty()  # colours only on a terminal, never in a redirected file
        for line in proc.stdout:
            if log_fh:
                log_fh.write(ANSI.sub("", line))  # Flower colours its lines whatever they are written to
                log_fh.flush()
            if run_id is None and (started := _STARTED.search(line)):
                run_id = int(started.group(1))
            if not echo:
                continue
            if boxed.feed(line):
                if boxed.message:
                    print(f"fedrad run: flwr: {boxed.message}", file=sys.stderr, flush=True)
            elif _worth_showing(line):
                print((line if colour_ok else ANSI.sub("", line)).rstrip(), flush=True)
        code = proc.wait()
        return _run_outcome(code, run_id, superlink, ca_cert, log_path)
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
STATUS_POLL_SECONDS = 5.0


def _run_outcome(code: int, run_id: int | None, superlink: str, ca_cert: Path | None, log_path: Path | None) -> int:
    """flwr's exit code, unless the coordinator says the run did not complete (a run still going when the stream
    ended is waited for).

    `flwr run --stream` (Flower 1.41) exits 0 once the stream ends, also when the ServerApp raised (its
    "Exit Code: 201" is only printed in the stream), so an operator's script, CI or benchmark would take a failed
    run for a finished one. The run's status at the coordinator (`flwr ls --run-id`) decides instead; when the
    coordinator cannot be asked, flwr's code stands.
    """
    if code != 0 or run_id is None:
        return code
    said_waiting = False
    while True:
        try:
            runs = flwr_json(["ls", "--run-id", str(run_id)], superlink, ca_cert).get("runs") or []
        except CoordinatorError:
            return code
        status = str(runs[0].get("status") or "") if runs else ""
        if not runs or status.startswith("finished:"):
            break
        # The stream can end while the run goes on (a busy SuperLink): follow the run to its end, not the stream.
        if not said_waiting:
            print(f"fedrad run: the stream ended while run {run_id} is {status or 'unknown'} at the coordinator; "
                  "waiting for it to finish", file=sys.stderr, flush=True)
            said_waiting = True
        time.sleep(STATUS_POLL_SECONDS)
    if status == "finished:completed" or not runs:
        return code
    where = f"; its log: {log_path}" if log_path else ""
    print(f"fedrad run: run {run_id} ended {status} at the coordinator{where}", file=sys.stderr, flush=True)
    return RUN_FAILED_EXIT


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


def app_run_config(app: Path | None = None) -> dict[str, object]:
    """The app's run-config defaults: `[tool.flwr.app.config]` of its pyproject.toml, as Flower reads them."""
    pyproject = Path(app or app_dir()) / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def validate_run_config(overrides: dict[str, object], app: Path | None = None) -> None:
    """Refuse a run-config the ServerApp would refuse, before anything is submitted (ValueError names the key).

    The same checks as the ServerApp: the app's defaults fused with the overrides, `RunConfig.from_flower`
    (whose rules include the privacy settings).
    """
    from fedrad.common.run_config import RunConfig

    config = app_run_config(app)
    config.update(overrides)
    cfg = RunConfig.from_flower(config)  # every rule: the ServerApp and each site build the same RunConfig
    if cfg.init and not cfg.resume:  # a missing checkpoint or bundle: one line now, not a dead ServerApp later
        from fedrad.common.init_weights import init_kind

        init_kind(cfg.init, cfg.init_pubkey or None)


def run_main(*, superlink: str = "127.0.0.1:8000", run_dir: str | os.PathLike[str] | None = None,
             resume: str | os.PathLike[str] | None = None, config: list[str] | None = None,
             certs: str | os.PathLike[str] | None = None, sign_key: str | os.PathLike[str] | None = None,
             valid_days: float = 7.0, detach: bool = False) -> int:
    """`fedrad run`: check the run-config (`config`: `-c` values), sign it with sign_key, submit it and follow it
    to its end (detach: return once the coordinator accepted it); returns the exit status (0 finished)."""
    config = list(config or [])
    overrides = parse_overrides(config)
    superlink = with_default_port(superlink)
    if resume:
        folder = Path(resume).resolve()
        if not (folder / "run.json").exists():
            raise FileNotFoundError(f"--resume {folder}: not a fedrad run directory (no run.json)")
        # The original run's config, then any new overrides (e.g. a new timeout).
        original = json.loads((folder / "run.json").read_text())["config"]
        # The old signature covered the old config; the resumed run is signed afresh (--sign-key).
        merged = {k: v for k, v in original.items() if k not in ("resume", "run-dir", "run-signature")}
        merged.update(overrides)
        overrides = merged
        overrides["resume"] = True
    else:
        folder = Path(run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    overrides["run-dir"] = str(folder)
    for key in ("init", "init-pubkey"):  # the ServerApp runs elsewhere: absolute paths (on the coordinator)
        if overrides.get(key):
            overrides[key] = str(Path(str(overrides[key])).expanduser().resolve())
    files = [Path(c) for c in config if c.endswith(".toml") and "=" not in c]
    validate_with_lines(overrides, files)  # a bad -c value: one line naming the key (and line), exit 2
    ca = ca_from(certs)
    key = Path(sign_key).resolve() if sign_key else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only disk: one line (exit 2), not a traceback
        raise ValueError(f"--run-dir {folder}: cannot make the run folder ({exc.strerror})") from None
    if key is None:
        print("fedrad run: warning: unsigned run (no --sign-key): sites refuse it unless started with "
              "--allow-unsigned", file=sys.stderr, flush=True)
    print(f"fedrad run: submitting to {superlink}; run directory {folder}", flush=True)
    valid = float(valid_days or 0) * 86_400 or None  # --valid-days (signed runs' expiry)
    if detach:
        return detach_run(superlink, overrides, folder, ca, key, os.fspath(certs) if certs else None,
                          valid_seconds=valid)
    code = submit_run(superlink, overrides, log_path=folder / "flwr-run.log", ca_cert=ca, sign_key=key,
                      valid_seconds=valid)
    return report_run(folder, code)


def submit_detached(superlink: str, overrides: dict[str, object], ca_cert: Path | None = None,
                    sign_key: Path | None = None, app: Path | None = None, timeout: float = 300.0,
                    valid_seconds: float | None = None) -> int:
    """`flwr run` without `--stream`: the coordinator accepts the run and Flower returns at once.

    Returns the run id the coordinator gave; ValueError with Flower's own reason when it refused the run."""
    app = Path(app or app_dir())
    config_text = run_config_string(overrides, app, sign_key, valid_seconds)
    home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedrad-flwr-")), superlink, ca_cert)
    cmd = [tool("flwr"), "run", str(app), "fedrad"] + (["--run-config", config_text] if config_text else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=flower_env({"FLWR_HOME": str(home)}),
                             timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"{superlink}: no answer in {timeout:.0f} s") from None
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = ANSI.sub("", out.stdout + out.stderr)
    started = _STARTED.search(text)
    if started:
        return int(started.group(1))
    boxed, reason = FlowerBox(), ""
    for line in text.splitlines():
        if boxed.feed(line) and boxed.message:
            reason = boxed.message
    last = [line.strip() for line in text.splitlines() if line.strip()]
    raise SubmitError(reason or (last[-1] if last else f"flwr exited with {out.returncode}"))


class SubmitError(Exception):
    """The coordinator did not accept the run; the message is Flower's reason."""


def detach_run(superlink: str, overrides: dict[str, object], run_dir: Path, ca_cert: Path | None,
               sign_key: Path | None, certs: str | None, valid_seconds: float | None = None) -> int:
    """`fedrad run --detach`: submit, print the run id and how to re-attach, return (the run goes on)."""
    try:
        run_id = submit_detached(superlink, overrides, ca_cert, sign_key, valid_seconds=valid_seconds)
    except SubmitError as exc:
        print(f"fedrad run: the coordinator did not accept the run: {exc}", file=sys.stderr, flush=True)
        return 1
    where = f" --superlink {superlink}" + (f" --certs {certs}" if certs else "")
    print(f"fedrad run: run {run_id} submitted (detached); run directory {run_dir}", flush=True)
    print(f"fedrad run: re-attach with: fedrad log {run_id} --follow{where}", flush=True)
    print(f"fedrad run: stop it with:   fedrad stop {run_id}{where}", flush=True)
    return 0


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
