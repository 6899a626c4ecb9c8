"""fedrad's site runtime: the only code that answers the coordinator at a site, whatever the run's FAB says.

Flower's default SuperNode installs the FAB sent with each run and imports the `clientapp` its pyproject
names, so whoever submits a run chooses the Python that runs next to the hospital's images. Here the
SuperNode runs with `--isolation process` (it only stores messages; it never installs or imports a FAB) and
this runtime, started by `fedrad node`, does the ClientApp side itself:

- `serve` starts the SuperNode as its child (Runtime API on loopback, AcquireTask guarded by a per-start
  secret), claims each pending message token and hands it, through a pipe, to the warm `worker` process of
  that message's run (`WorkerPool`): one worker per run id, started on the run's first message, so a crash
  in one run cannot poison the next; the previous run's worker is retired (its pipe closed: it finishes what
  it holds and exits) when another run starts, or after WORKER_IDLE_SECONDS without a message. A worker that
  died is replaced on the run's next message; the message it held gets no reply (the round loop counts the
  site as dropped, as it does when a site dies). `--fresh-process-per-message` keeps the older mode, a fresh
  `task` process per message (the fallback, and the baseline of benchmarks/bench_round_overhead.py);
- `worker` / `task` handle a message (`run_task`): pull the message, the run and the FAB bytes, check the
  consortium's signature over the FAB's sha256 and the fused run-config (fedrad.common.run_signature) with
  the site's `consortium.pub` on EVERY message (a worker caches the verdict by FAB sha256, config hash and key
  file), then the signed claims (expiry, message types, round bound, the nonce bound to the first Flower run
  id that used it: `check_claims`, never cached), and only then call the ClientApp INSTALLED at the site
  (fedrad's own, or one the site names itself), whose mods (wire guard, site policy, privacy) apply to every
  message. The FAB is never unpacked to disk, installed or imported. A refusal is an error reply with a fixed
  code and text (fedrad.common.protocol), and a line with the rule and reason in the site's audit log.

A warm worker keeps imports, the decoded site data and the model resident between messages of its run
(fedrad.client.app.task's resident cache); a message then costs its deserialisation plus its work.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.client.runtime.log_lines import configure_logging, copy_formatted
from fedrad.client.runtime.poll_timing import ACQUIRE_IDLE_SECONDS, ACQUIRE_POLL_SECONDS, PULL_BACKOFF, in_run
from fedrad.client.runtime.site_trust import (
    DEFAULT_CLIENT_APP,
    SiteTrust,
    VerdictCache,
    check_claims,
    check_run,
    load_site_app,
)
from fedrad.common.protocol import ErrorCode
from fedrad.common.run_signature import (
    fused_run_config,
    sha256_hex,
)

TOKEN_ENV = "FEDRAD_RUNTIME_TOKEN"  # the task token travels in the child's environment, not on its command line
WORKER_IDLE_SECONDS = 900.0  # a run's worker with no message for this long leaves (its memory with it)
MAX_WORKERS = 3  # warm workers alive at once, retiring ones included; the oldest retiring one is stopped first
_ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
log = logging.getLogger("fedrad.runtime")


def refuse(message, code: ErrorCode, rule: str, reason: str, node_config, entry: dict[str, Any]):
    """The runtime's refusal (fedrad.client.app.error_reply.refuse: logged, one line in `<audit-dir>/refusals.jsonl`,
    the code alone in the reply); imported here: `serve` never loads Flower's app."""
    from fedrad.client.app.error_reply import refuse as site_refuse

    return site_refuse(message, code, rule, reason, audit=node_config, entry=entry)


# --- one message: `task` ------------------------------------------------------------------------------


def _runtime_client(address: str, interceptors: list, max_tries: int | None = None):
    """A client of the SuperNode's Runtime API on loopback (Flower's own client, retries and interceptors)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    if max_tries is not None:
        retry.max_tries = max_tries
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=retry)


def pull_task_input(client):
    """(message, context, run, fab) of the token's task: flwr 1.41's `run_clientapp.pull_task_input`, with the
    message's objects pulled at PULL_BACKOFF instead of Flower's 1 s..10 s backoff."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1])
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def run_task(address: str, token: str, trust: SiteTrust, verdicts: VerdictCache | None = None) -> int:
    """Handle the one message behind `token`: verify the run, run the site's ClientApp, push the reply.

    `verdicts`: a warm worker's cache of signature verdicts (None: check from scratch, as a `task` does)."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _runtime_client(address, [RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, exit_code = SubStatus.FAILED, 1
    t_start = time.perf_counter()
    t_pulled = t_handled = t_start
    try:
        message, context, run, fab = pull_task_input(client)
        t_pulled = time.perf_counter()
        try:
            run_config = fused_run_config(fab.content, run.override_config)
            reason = (verdicts.check if verdicts is not None else check_run)(trust, fab.content, run_config)
        except Exception as exc:  # an unreadable FAB or config is a run nobody signed
            run_config, reason = {}, f"the FAB or its run-config cannot be read ({type(exc).__name__})"
        if reason is not None:
            reply = refuse(message, ErrorCode.RUN_NOT_SIGNED, "run_signature", reason, context.node_config, {
                "event": "refused", "rule": "run_signature", "code": int(ErrorCode.RUN_NOT_SIGNED), "reason": reason,
                "run_id": run.run_id, "message_type": message.metadata.message_type,
                "fab_id": run.fab_id, "fab_version": run.fab_version, "fab_sha256": sha256_hex(fab.content)})
        elif (refused := check_claims(run_config, message, run.run_id, context.node_config)) is not None:
            reply = refuse(message, refused[2], refused[0], refused[1], context.node_config, {
                "event": "refused", "rule": refused[0], "code": int(refused[2]), "reason": refused[1],
                "run_id": run.run_id, "message_type": message.metadata.message_type,
                "fab_sha256": sha256_hex(fab.content)})
        else:
            # The ClientApp sees exactly the config that was verified, not whatever the node state holds.
            context.run_config = run_config
            # The site's own key, for verifying released bundles (fedrad.client.app.release_handler).
            context.node_config = {**context.node_config, "consortium-key": str(trust.consortium_key or "")}
            reply = load_site_app(trust)(message=message, context=context)
        t_handled = time.perf_counter()
        status, exit_code = SubStatus.COMPLETED, 0
    except Exception as exc:
        log.exception("fedrad runtime: the site's ClientApp failed")  # the details stay in the node's log
        if message is not None:
            reply = refuse(message, ErrorCode.SITE_FAILED, "failed", type(exc).__name__,
                           context.node_config if context is not None else {}, {
                               "event": "failed", "code": int(ErrorCode.SITE_FAILED), "reason": type(exc).__name__,
                               "run_id": message.metadata.run_id, "message_type": message.metadata.message_type})
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("fedrad runtime: could not push the reply to the SuperNode")
            exit_code = 1
        push_task_output(client=client, context=context, sub_status=status, details="")
        heartbeat.stop()
        client.close()
        log.debug("fedrad runtime: message pulled in %.2f s, handled in %.2f s, reply pushed in %.2f s",
                  t_pulled - t_start, t_handled - t_pulled, time.perf_counter() - max(t_handled, t_pulled))
    return exit_code


def run_worker(address: str, trust: SiteTrust, tokens) -> int:
    """A warm worker: handle each token read from `tokens` (one per line, from `serve`'s pipe) in this process,
    one at a time, until the pipe closes. Each message is handled exactly as `task` handles it; what stays
    resident between messages is the imports, the verdict cache and fedrad.client.app.task's resident state."""
    verdicts = VerdictCache()
    handled = 0
    for line in tokens:
        token = line.strip()
        if not token:
            continue
        run_task(address, token, trust, verdicts)
        handled += 1
        _release_memory()
    log.debug("fedrad runtime: worker leaves after %d messages", handled)
    return 0


def _release_memory() -> None:
    """Between messages: free the message's cycles and hand freed heap back to the OS (glibc), so the worker's
    RSS tracks what is resident, not the peak of the last message."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the site process: `serve` ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the SuperNode gets SIGTERM when this runtime dies, however it dies (no orphan node)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperNode exited with {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the SuperNode's Runtime API did not open 127.0.0.1:{port} in {timeout:.0f}s")


@dataclass
class _Worker:
    run_id: int
    proc: subprocess.Popen
    last_used: float


class WorkerPool:
    """`serve`'s warm workers: one per run id; the token goes down the worker's stdin pipe, never on a
    command line or in an environment. See the module docstring for when a worker is started and retired."""

    def __init__(self, worker_cmd: list[str], idle_seconds: float = WORKER_IDLE_SECONDS,
                 max_alive: int = MAX_WORKERS) -> None:
        self.worker_cmd, self.idle_seconds, self.max_alive = worker_cmd, idle_seconds, max_alive
        self.active: dict[int, _Worker] = {}
        self.retiring: list[_Worker] = []

    def hand(self, run_id: int, token: str) -> None:
        """Give `token` (a message of run `run_id`) to that run's worker, starting one when there is none."""
        for attempt in range(2):  # a worker that died since its last message: a fresh one takes the message
            worker = self.active.get(run_id)
            if worker is not None and worker.proc.poll() is not None:
                log.warning("fedrad runtime: the worker of run %s exited with %s; starting a new one", run_id,
                            worker.proc.returncode)
                del self.active[run_id]
                worker = None
            if worker is None:
                for other in list(self.active):  # another run started: the previous run's worker finishes and leaves
                    self._retire(self.active.pop(other))
                worker = self._start(run_id)
            try:
                assert worker.proc.stdin is not None
                worker.proc.stdin.write(token + "\n")
                worker.proc.stdin.flush()
                worker.last_used = time.monotonic()
                return
            except OSError:  # the worker died between the check and the write
                self.active.pop(run_id, None)
                if attempt:
                    log.error("fedrad runtime: no worker of run %s took its message", run_id)

    def _start(self, run_id: int) -> _Worker:
        self._cap(self.max_alive - 1)
        proc = subprocess.Popen([*self.worker_cmd, "--run-id", str(run_id)], stdin=subprocess.PIPE, text=True,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 (serve is single-threaded here)
        worker = _Worker(run_id, proc, time.monotonic())
        self.active[run_id] = worker
        log.info("fedrad runtime: warm worker %d started for run %s", proc.pid, run_id)
        return worker

    def _retire(self, worker: _Worker) -> None:
        """Close the worker's pipe: it handles what it holds, then exits by itself."""
        try:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        except OSError:
            pass
        self.retiring.append(worker)

    def _cap(self, limit: int) -> None:
        """Stop the oldest retiring workers until at most `limit` workers are alive."""
        self.retiring = [w for w in self.retiring if w.proc.poll() is None]
        while self.retiring and len(self.retiring) + len(self.active) > limit:
            self.retiring.pop(0).proc.terminate()

    def tick(self) -> None:
        """Each poll: forget workers that exited, retire those idle for `idle_seconds`."""
        now = time.monotonic()
        for run_id, worker in list(self.active.items()):
            if worker.proc.poll() is not None:
                log.warning("fedrad runtime: the worker of run %s exited with %s", run_id, worker.proc.returncode)
                del self.active[run_id]
            elif now - worker.last_used > self.idle_seconds:
                self._retire(self.active.pop(run_id))
        self._cap(self.max_alive)

    def processes(self) -> list[subprocess.Popen]:
        return [w.proc for w in [*self.active.values(), *self.retiring]]


def serve(port: int, trust: SiteTrust, supernode_cmd: list[str], log_level: str = "INFO") -> int:
    """Run the SuperNode (process isolation) and hand every message it receives to its run's warm worker
    (or, with `trust.fresh_process_per_message`, to a fresh `task` process)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    secret = secrets.token_bytes(32)
    secret_dir = Path(tempfile.mkdtemp(prefix="fedrad-node-"))  # 0700: only this user reads the secret
    secret_file = secret_dir / "runtime.secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    if Path(supernode_cmd[0]).name == "flower-supernode":  # the same entry point, idle poll 0.5 s, not 3 s
        supernode_cmd = [sys.executable, "-I", "-u", "-m", "fedrad.client.runtime.node_poll", *supernode_cmd[1:]]
    cmd = [*supernode_cmd, "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
           "--superexec-auth-secret-file", str(secret_file)]
    node_env = dict(os.environ, FLWR_LOG_LEVEL=log_level)
    plain = not sys.stderr.isatty()  # a log file: the SuperNode's lines without its colour codes
    pipe: dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    node = subprocess.Popen(cmd, env=node_env, preexec_fn=_die_with_parent,  # noqa: PLW1509 (single-threaded here)
                            **(pipe if plain else {}))
    if plain:
        threading.Thread(target=copy_formatted, args=(node.stdout, sys.stderr), daemon=True).start()
    tasks: list[subprocess.Popen] = []
    pool: WorkerPool | None = None

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        _wait_for_port(port, node, 120)
        secret_file.unlink()
        secret_dir.rmdir()
        # One try per poll: when the SuperNode goes away the loop must notice, not retry forever.
        client = _runtime_client(f"127.0.0.1:{port}", [SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods={_ACQUIRE_TASK})], max_tries=1)
        child = ["--port", str(port), "--log-level", log_level, *trust.args()]
        task_cmd = [sys.executable, "-I", "-u", "-m", RUNTIME_MODULE, "task", *child]
        if not trust.fresh_process_per_message:
            pool = WorkerPool([sys.executable, "-I", "-u", "-m", RUNTIME_MODULE, "worker", *child])
        whose = f"runs signed by {trust.consortium_key}" if trust.consortium_key else "unsigned runs"
        how = "a fresh process per message" if pool is None else "a warm worker per run"
        log.info("fedrad runtime: serving %s for %s (%s)", trust.client_app, whose, how)
        last_task = float("-inf")  # fast AcquireTask polls only while the site is in a run (poll_timing.py)
        while node.poll() is None:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is stopping or restarting its API: look again shortly
                log.debug("fedrad runtime: AcquireTask failed: %s", exc)
                res = None
            got = res is not None and res.HasField("task") and bool(res.token)
            if got:
                last_task = time.monotonic()
            if got and pool is not None:
                pool.hand(int(res.task.run_id), res.token)
            elif got:
                env = dict(os.environ, **{TOKEN_ENV: res.token})
                tasks.append(subprocess.Popen(task_cmd, env=env, preexec_fn=_die_with_parent))  # noqa: PLW1509
            tasks = [t for t in tasks if t.poll() is None]
            if pool is not None:
                pool.tick()
            if not got:  # one message claimed: look again at once (a SecAgg+ stage or the next run may wait)
                time.sleep(ACQUIRE_POLL_SECONDS if in_run(last_task, time.monotonic()) else ACQUIRE_IDLE_SECONDS)
        return node.returncode or 0
    finally:
        children = [*tasks, *(pool.processes() if pool is not None else []), node]
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
        for proc in children:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        secret_file.unlink(missing_ok=True)
        if secret_dir.exists():
            secret_dir.rmdir()


# The runtime's processes are started as `python -m fedrad.deploy.runtime_entry MODE ...`, whose command line the
# fedrad shell parses (fedrad.deploy.cli.parse_runtime_args) into RuntimeArgs for `run_runtime`.
RUNTIME_MODULE = "fedrad.deploy.runtime_entry"
RUNTIME_MODES = ("serve", "worker", "task")


@dataclass(frozen=True)
class RuntimeArgs:
    """What a runtime process is told: its mode (serve: the SuperNode's side; worker: a run's warm process; task:
    one message in a fresh process), the Runtime API port, the site's trust settings, and for serve the SuperNode
    command (after `--` on the command line)."""

    mode: str
    port: int
    consortium_key: Path | None = None
    allow_unsigned: bool = False
    client_app: str = DEFAULT_CLIENT_APP
    client_app_dir: Path | None = None
    log_level: str = "INFO"
    fresh_process_per_message: bool = False
    run_id: int = 0
    supernode_cmd: tuple[str, ...] = ()


def run_runtime(args: RuntimeArgs) -> int:
    """Run one runtime process; its exit status (2: bad input, said in one line on stderr)."""
    supernode_cmd = list(args.supernode_cmd)
    configure_logging(args.log_level)
    trust = SiteTrust(args.consortium_key, args.allow_unsigned, args.client_app, args.client_app_dir,
                      args.fresh_process_per_message)
    if args.mode == "worker":
        log.debug("fedrad runtime: worker for run %s", args.run_id)
        return run_worker(f"127.0.0.1:{args.port}", trust, sys.stdin)
    if args.mode == "task":
        token = os.environ.pop(TOKEN_ENV, "")
        if not token:
            print(f"fedrad runtime: error: no task token in ${TOKEN_ENV}", file=sys.stderr)
            return 2
        return run_task(f"127.0.0.1:{args.port}", token, trust)
    if not supernode_cmd:
        print("fedrad runtime: error: serve needs the SuperNode command after '--'", file=sys.stderr)
        return 2
    if trust.consortium_key is None and not trust.allow_unsigned:
        print("fedrad runtime: error: give --consortium-key consortium.pub (or --allow-unsigned for local "
              "experiments)", file=sys.stderr)
        return 2
    if trust.consortium_key is not None:
        from fedrad.common.keys import KeyFileError, load_public_key

        try:
            load_public_key(trust.consortium_key)
        except KeyFileError as exc:
            print(f"fedrad runtime: error: --consortium-key: {exc}", file=sys.stderr)
            return 2
    return serve(args.port, trust, supernode_cmd, args.log_level)
