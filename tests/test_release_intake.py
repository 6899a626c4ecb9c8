"""A release reaching a site: no byte of it is written before its signed manifest is verified and every file
matches that manifest; a site keeps at most its quota of releases.

What the site writes is observed with a Python audit hook (sys.addaudithook): every `open` for writing and
every `mkdir` the interpreter performs while the site's real ClientApp answers the message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from release_fixtures import bundle_files, two_releases

from fedrad.client.site.release_store import (
    ReleaseQuota,
    ReleaseRefused,
    held_releases,
    judge_offer,
    record_participation,
    store_release,
)
from fedrad.client.site.site_state import SiteState
from fedrad.common.bundle import SIGNATURE, WEIGHTS
from fedrad.common.release_wire import RELEASE_CODE, ReleaseCode, split_chunks

_WATCH: dict[str, object] = {"root": None, "writes": []}


def _hook(event: str, args: tuple) -> None:
    """Record writes and folder creations under the watched folder (inert while none is watched)."""
    root = _WATCH["root"]
    if root is None or event not in ("open", "os.mkdir") or not args or not isinstance(args[0], str | bytes
                                                                                        | os.PathLike):
        return
    path = os.fsdecode(args[0])
    if not path.startswith(str(root)):
        return
    if event == "os.mkdir":
        _WATCH["writes"].append(("mkdir", path))
        return
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
        bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
    if writing:
        _WATCH["writes"].append(("write", path))


sys.addaudithook(_hook)  # hooks cannot be removed; this one does nothing unless a test sets _WATCH["root"]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return two_releases(tmp_path_factory.mktemp("intake"))


def _site_app_call(msg, tmp_path: Path, pub: Path):
    """The site's real ClientApp (mods included), its audit kept outside the state folder."""
    from flwr.app import Context, RecordDict

    from fedrad.client.app.client_app import app
    from fedrad.deploy.run_command import app_run_config

    node_config = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"),
                   "audit-dir": str(tmp_path / "audit"), "consortium-key": str(pub)}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=app_run_config())
    return app(message=msg, context=context)


def _files_msg(files: dict[str, bytes]):
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedrad.common.release_wire import MESSAGE_FILES

    arrays = {k: Array(np.frombuffer(v, dtype=np.uint8).copy()) for name, data in files.items()
              for k, v in split_chunks(name, data, chunk=1 << 20)}
    return Message(RecordDict({"bundle": ArrayRecord(arrays)}), dst_node_id=1, message_type=MESSAGE_FILES)


@pytest.mark.parametrize("damage", ["unsigned", "wrong_key", "weights"])
def test_unsigned_release_bytes_never_touch_the_state_folder(signed, tmp_path, damage):
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.server.release import generate_keys

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    first, _, _, pub = signed
    (tmp_path / "data").mkdir()
    state = SiteState(tmp_path / "state", tmp_path / "audit")
    record_participation(state, 1, None)  # the site took part: only the signature stands in the way
    files = bundle_files(first)
    files[WEIGHTS] = os.urandom(4 << 20)  # 4 MiB of weights nobody signed
    if damage == "unsigned":
        files[SIGNATURE] = bytes(64)
    elif damage == "wrong_key":
        pub = generate_keys(tmp_path / "other")[1]
    _WATCH.update(root=str(state.root), writes=[])
    try:
        reply = _site_app_call(_files_msg(files), tmp_path, pub)
    finally:
        _WATCH["root"] = None
    assert dict(reply.content.metric_records["metrics"]) == {RELEASE_CODE: ReleaseCode.REFUSED_UNVERIFIED}
    # the state's own bookkeeping (state.json, the lock) is opened for every message; no release byte is
    # written, not even to a temporary folder removed afterwards
    release_writes = [w for w in _WATCH["writes"] if w[1] != str(state.root) and
                      not Path(w[1]).name.startswith((".lock", "state.json", ".state.json."))]
    assert release_writes == [] and _WATCH["writes"], _WATCH["writes"]
    assert not (state.root / "releases").exists() and (tmp_path / "audit" / "refusals.jsonl").is_file()


def test_the_site_quota_of_held_releases(signed, tmp_path):
    first, second, _, pub = signed
    state = SiteState(tmp_path / "state", tmp_path / "audit")
    record_participation(state, 1, None)
    assert store_release(state, bundle_files(first), pub, ReleaseQuota(max_releases=1))[0] == ReleaseCode.STORED
    _WATCH.update(root=str(state.root / "releases"), writes=[])
    try:
        with pytest.raises(ReleaseRefused) as refused:
            store_release(state, bundle_files(second), pub, ReleaseQuota(max_releases=1))
    finally:
        _WATCH["root"] = None
    assert refused.value.code == ReleaseCode.REFUSED_QUOTA and "quota is 1 releases" in str(refused.value)
    assert _WATCH["writes"] == [] and [h.release_id for h in held_releases(state.root)] == ["1-1"]
    size = sum(len(d) for d in bundle_files(second).values())
    with pytest.raises(ReleaseRefused, match="bytes"):  # the byte quota: what is held plus the newcomer
        store_release(state, bundle_files(second), pub, ReleaseQuota(max_releases=9, max_bytes=size))
    assert store_release(state, bundle_files(second), pub, ReleaseQuota(max_releases=2))[0] == ReleaseCode.STORED
    assert ReleaseQuota.from_node_config({"max-releases": "3", "max-release-bytes": ""}) == ReleaseQuota(3)
    # a full store declines the offer itself, so the weights never travel
    assert judge_offer(state, "1", "", 3, "2099-01-01T00:00:00Z", "1-3", ReleaseQuota(max_releases=2)) == \
        ReleaseCode.REFUSED_QUOTA
