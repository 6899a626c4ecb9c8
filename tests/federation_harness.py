"""A real local consortium for tests: one SuperLink and SuperNodes as real processes on loopback.

Sites start the way `fedrad node` starts them: fedrad's runtime around a process-isolated SuperNode, trusting
the consortium key this harness generates; `run` signs with it unless told otherwise.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.client.runtime.site_runtime import SiteTrust
from fedrad.deploy.processes import (
    ProcessGroup,
    TlsFiles,
    flower_env,
    free_port,
    superlink_command,
    supernode_command,
    wait_for_port,
)
from fedrad.deploy.run_command import submit_run

# Small enough that a round is mostly Flower's process start-up.
TINY_RUN: dict[str, object] = {
    "model": "test_resnet",
    "image-size": 32,
    "local-steps": 3,
    "batch-size": 8,
    "proj-dim": 32,
    "round-timeout": 120.0,
}

# A site-side ClientApp (module poison_client, attribute app) that a test site chooses to run itself.
POISON_APP = Path(__file__).parent / "poison_app"
POISON_CLIENT = "poison_client:app"



def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 0.2 s until it holds; fail the test naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Consortium:
    workdir: Path
    group: ProcessGroup = field(default_factory=ProcessGroup)
    port: int = 0
    link: subprocess.Popen | None = None
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls: TlsFiles | None = None
    _keys: tuple[Path, Path] | None = None

    @property
    def consortium_key(self) -> Path:
        """Private consortium key (made on first use): `run` signs with it."""
        return self._consortium_keys()[0]

    @property
    def consortium_pub(self) -> Path:
        """The consortium public key every node trusts by default."""
        return self._consortium_keys()[1]

    def _consortium_keys(self) -> tuple[Path, Path]:
        if self._keys is None:
            from fedrad.server.release import generate_keys

            self._keys = generate_keys(self.workdir / "keys" / "consortium")
        return self._keys

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_link(self, tls: TlsFiles | None = None, node_auth: bool = False) -> None:
        if not self.port:
            self.port = free_port()
        self.tls = tls
        state = self.workdir / "coordinator"
        state.mkdir(parents=True, exist_ok=True)
        self.link = self.group.start("superlink", superlink_command(state, "127.0.0.1", self.port, tls, node_auth),
                                     self.workdir / "logs" / "superlink.log")
        wait_for_port("127.0.0.1", self.port, 60, self.link)

    def start_node(self, name: str, site: Path, env: dict[str, str] | None = None,
                   tls: TlsFiles | None = None, trust: SiteTrust | None = None,
                   config: dict[str, object] | None = None) -> subprocess.Popen:
        """A site; by default it runs fedrad's installed ClientApp for runs signed by this consortium.
        `config`: extra node-config entries (e.g. "policy": a site policy file)."""
        cfg = {"data-dir": str(site), "cache-dir": str(self.workdir / "cache" / name), "device": "cpu",
               "audit-dir": str(self.audit_dir(name)), "state-dir": str(self.workdir / "state" / name),
               **(config or {})}
        trust = trust or SiteTrust(consortium_key=self.consortium_pub)
        proc = self.group.start(f"node-{name}", supernode_command(self.address, free_port(), cfg, tls, trust),
                                self.workdir / "logs" / f"node-{name}.log", env=flower_env(env))
        self.nodes[name] = proc
        return proc

    def audit_dir(self, name: str) -> Path:
        return self.workdir / "audit" / name

    def run(self, overrides: dict[str, object], app: Path | None = None, timeout: float = 600,
            sign_key: Path | None | bool = True) -> int:
        """Submit a run; `sign_key` True signs with the consortium key, False/None submits it unsigned."""
        cfg = dict(TINY_RUN)
        cfg.update(overrides)
        ca = self.tls.ca_cert if self.tls else None
        key = self.consortium_key if sign_key is True else (sign_key or None)
        return submit_run(self.address, cfg, log_path=self.workdir / "logs" / "flwr-run.log", app=app,
                          timeout=timeout, echo=False, ca_cert=ca, sign_key=key)

    def stop(self) -> None:
        self.group.stop()
