"""A real local consortium for tests: one SuperLink and SuperNodes as real processes on loopback."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.deploy.processes import (
    ProcessGroup,
    TlsFiles,
    flower_env,
    free_port,
    submit_run,
    superlink_command,
    supernode_command,
    wait_for_port,
)

# Small enough that a round is mostly Flower's process start-up.
TINY_RUN: dict[str, object] = {
    "model": "test_resnet",
    "image-size": 32,
    "local-steps": 3,
    "batch-size": 8,
    "proj-dim": 32,
    "round-timeout": 120.0,
}

POISON_APP = Path(__file__).parent / "poison_app"


@dataclass
class Consortium:
    workdir: Path
    group: ProcessGroup = field(default_factory=ProcessGroup)
    port: int = 0
    link: subprocess.Popen | None = None
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls: TlsFiles | None = None

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
                   tls: TlsFiles | None = None, config: dict[str, object] | None = None) -> subprocess.Popen:
        cfg = {"data-dir": str(site), "cache-dir": str(self.workdir / "cache" / name), "device": "cpu",
               "audit-dir": str(self.workdir / "audit" / name), "state-dir": str(self.workdir / "state" / name),
               **(config or {})}  # e.g. "policy": a site policy file
        proc = self.group.start(f"node-{name}", supernode_command(self.address, free_port(), cfg, tls),
                                self.workdir / "logs" / f"node-{name}.log", env=flower_env(env))
        self.nodes[name] = proc
        return proc

    def run(self, overrides: dict[str, object], app: Path | None = None, timeout: float = 600) -> int:
        cfg = dict(TINY_RUN)
        cfg.update(overrides)
        ca = self.tls.ca_cert if self.tls else None
        return submit_run(self.address, cfg, log_path=self.workdir / "logs" / "flwr-run.log", app=app,
                          timeout=timeout, echo=False, ca_cert=ca)

    def stop(self) -> None:
        self.group.stop()
