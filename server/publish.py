"""Distributing a signed release to the sites over the consortium's own Flower connection.

The coordinator keeps the published list in a folder (run-config `publish-dir`, `fedrad publish --releases`):
one sub-folder per release id, holding only the allowlisted bundle files. For every node it meets, the
ServerApp offers the latest release (a few strings and numbers); a node that answers WANT gets the files as
uint8 arrays (common.release_wire) and answers with a code once it has verified and stored them. The
coordinator never decides what a site trusts: each site checks the bundle with its own consortium key.

A publish-only run (`fedrad publish`) keeps polling for nodes for `publish-linger` seconds, so a site that
connects later still gets the release; a training run with `publish-dir` set offers it once, at its start,
to every node connected then. Every answer is appended to `<publish-dir>/publish-log.jsonl`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrad.common.atomic import atomic_write_bytes
from fedrad.common.bundle import CREATED_FORMAT, MANIFEST, MAX_MANIFEST_BYTES, read_bounded
from fedrad.common.protocol import METRICS
from fedrad.common.release_wire import (
    BUNDLE,
    BUNDLE_FILES,
    CONFIG,
    DONE_CODES,
    MESSAGE_FILES,
    MESSAGE_OFFER,
    OFFER_CREATED,
    OFFER_ID,
    OFFER_RUN_ID,
    OFFER_RUN_KEY,
    OFFER_SEQUENCE,
    REQUIRED_FILES,
    ReleaseCode,
    ReleaseWireError,
    manifest_release_id,
    reply_code,
    split_chunks,
)
from fedrad.server.exchange import REPLY_POLL_SECONDS

PUBLISH_LOG = "publish-log.jsonl"
POLL_SECONDS = 2.0  # how often a lingering publish run looks for newly connected nodes
OFFER_TIMEOUT = 60.0  # a ClientApp process start plus a read of the site's store
FILES_TIMEOUT = 600.0  # a transfer plus verification (hashing the weights) at the site
MAX_TRIES = 3  # a node that never answers is offered the release this many times, then left


@dataclass(frozen=True)
class Published:
    """A release in the coordinator's folder (read unverified: the sites verify it)."""

    release_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def order(self) -> tuple[str, int]:
        return str(self.manifest.get("created", "")), int(self.manifest["release"]["sequence"])


def published_releases(folder: Path) -> list[Published]:
    """The releases in `folder`, oldest first (a sub-folder without a readable manifest is skipped)."""
    out = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            manifest = json.loads(read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES, "manifest"))
            out.append(Published(manifest_release_id(manifest), path, manifest))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log(WARNING, "fedrad publish: %s skipped: %s", path, exc)
    return sorted(out, key=lambda p: p.order)


def stage_release(bundle: Path, folder: Path) -> Path:
    """Copy the allowlisted files of a (verified) bundle into `folder/<release id>/`, each file atomically."""
    manifest = json.loads(read_bounded(Path(bundle) / MANIFEST, MAX_MANIFEST_BYTES, "manifest"))
    target = Path(folder) / manifest_release_id(manifest)
    target.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:
        src = Path(bundle) / name
        if src.is_file():
            atomic_write_bytes(target / name, src.read_bytes(), mode=0o644)
        else:
            (target / name).unlink(missing_ok=True)
    return target


def offer_content(release: Published) -> RecordDict:
    r = release.manifest["release"]
    return RecordDict({CONFIG: ConfigRecord({
        OFFER_ID: release.release_id, OFFER_RUN_ID: str(r["run_id"]), OFFER_RUN_KEY: str(r.get("run_key") or ""),
        OFFER_SEQUENCE: int(r["sequence"]), OFFER_CREATED: str(release.manifest.get("created", ""))})})


def files_content(release: Published) -> RecordDict:
    """The bundle's allowlisted files as 1-D uint8 arrays, chunked (a missing file is simply not sent)."""
    import numpy as np

    arrays: dict[str, Array] = {}
    for name in BUNDLE_FILES:
        path = release.path / name
        if not path.is_file():
            if name in REQUIRED_FILES:
                log(WARNING, "fedrad publish: %s lacks %s (the sites will refuse it)", release.path, name)
            continue
        for key, piece in split_chunks(name, path.read_bytes()):
            arrays[key] = Array(np.frombuffer(piece, dtype=np.uint8).copy())
    return RecordDict({BUNDLE: ArrayRecord(arrays)})


@dataclass
class Delivery:
    """Per node: its last code and how many offers went unanswered."""

    codes: dict[int, ReleaseCode] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)

    def pending(self, nodes: Iterable[int], untried_only: bool = False) -> list[int]:
        """Nodes still to offer the release to: no final answer yet, fewer than MAX_TRIES offers."""
        limit = 1 if untried_only else MAX_TRIES
        return [n for n in nodes if self.codes.get(n) not in DONE_CODES and self.tries.get(n, 0) < limit]


def _code(reply: Message, node: int) -> ReleaseCode | None:
    """The reply's ReleaseCode; None for an error reply (Flower's own for an unreachable node included) or
    one that breaks the contract (logged)."""
    if reply.has_error():
        log(WARNING, "fedrad publish: node %s answered error %s", node, reply.error.code)
        return None
    try:
        return reply_code(reply.content.metric_records[METRICS])
    except (KeyError, ReleaseWireError) as exc:
        log(WARNING, "fedrad publish: node %s: bad reply (%s)", node, exc)
        return None


def _log(folder: Path, release: Published, node: int, code: ReleaseCode | None, run_id: int) -> None:
    entry = {"utc": time.strftime(CREATED_FORMAT, time.gmtime()), "release": release.release_id, "node": node,
             "code": int(code) if code is not None else None, "result": code.name if code is not None else "no answer",
             "run_id": run_id}
    with open(folder / PUBLISH_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def deliver(grid: Grid, folder: Path, release: Published, nodes: list[int], delivery: Delivery,
            run_id: int) -> None:
    """Offer `release` to `nodes` and send the files to each node as soon as it answers WANT, so a node
    that does not answer delays no other; record every node's final answer."""
    final: dict[int, ReleaseCode | None] = {n: None for n in nodes}
    files: RecordDict | None = None
    now = time.monotonic()
    pending: dict[str, tuple[int, str, float]] = {}  # message id -> (node, type, deadline)

    def push(targets: list[int], content: RecordDict, message_type: str, timeout: float) -> None:
        msgs = [Message(content, dst_node_id=n, message_type=message_type) for n in targets]
        for node, mid in zip(targets, grid.push_messages(msgs), strict=True):
            if mid:
                pending[mid] = (node, message_type, time.monotonic() + timeout)

    push(nodes, offer_content(release), MESSAGE_OFFER, OFFER_TIMEOUT)
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node, message_type, _ = pending.pop(reply.metadata.reply_to_message_id)
            code = _code(reply, node)
            if message_type == MESSAGE_OFFER and code == ReleaseCode.WANT:
                log(INFO, "fedrad publish: sending release %s to node %s", release.release_id, node)
                files = files or files_content(release)
                push([node], files, MESSAGE_FILES, FILES_TIMEOUT)
            else:
                final[node] = code
        now = time.monotonic()
        for mid, (_, _, deadline) in list(pending.items()):
            if now >= deadline:
                del pending[mid]  # left as "no answer"; a lingering run offers again
        if pending:
            time.sleep(REPLY_POLL_SECONDS)
    for node in nodes:
        code = final[node]
        delivery.tries[node] = delivery.tries.get(node, 0) + (0 if code in DONE_CODES else 1)
        if code is not None:
            delivery.codes[node] = code
        _log(folder, release, node, code, run_id)
        log(INFO, "fedrad publish: node %s: release %s %s", node, release.release_id,
            code.name if code is not None else "no answer")


def publish(grid: Grid, folder: Path, linger: float, run_id: int) -> Delivery:
    """Serve the latest release in `folder` to every node met until `linger` seconds have passed (0: once)."""
    releases = published_releases(folder)
    delivery = Delivery()
    if not releases:
        log(WARNING, "fedrad publish: no release in %s: nothing to publish", folder)
        return delivery
    latest = releases[-1]
    log(INFO, "fedrad publish: offering release %s to the sites (linger %.0fs)", latest.release_id, linger)
    end = time.monotonic() + linger
    while True:
        expired = time.monotonic() >= end  # after that, only nodes never offered it yet are still served
        nodes = delivery.pending(sorted(grid.get_node_ids()), untried_only=expired)
        if nodes:
            deliver(grid, folder, latest, nodes, delivery, run_id)
        elif expired:
            return delivery
        else:
            time.sleep(POLL_SECONDS)


__all__ = ["Delivery", "PUBLISH_LOG", "Published", "deliver", "files_content", "offer_content", "publish",
           "published_releases", "stage_release"]
