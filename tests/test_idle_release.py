"""Between rounds the warm worker lets go of its model and the site images' memory maps (fedrad.client.app.task
.release_idle, node-config `idle-release`, default on); the next round rebuilds them and trains identically."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.app import task
from fedrad.common.node_config import NodeConfig
from fedrad.common.packing import Layout, pack, unpack
from fedrad.common.run_config import RunConfig
from fedrad.common.store_view import StoreView

RUN = {"model": "test_resnet", "image-size": 32, "local-steps": 2, "batch-size": 4, "proj-dim": 32,
       "objective": "simclr"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    (one,) = write_synthetic_sites(tmp_path_factory.mktemp("sites"), n_sites=1, patients_per_site=4, size=48)
    return one


def _round(tmp_path, site, server_round: int, idle_release: str | None):
    """One train message through handle_train + the ClientApp's release, as a warm worker handles it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    cfg = RunConfig.from_flower(RUN)
    import torch

    from fedrad.common.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim)
    node_config = {"data-dir": str(site), "cache-dir": str(tmp_path / "cache"), "state-dir": str(tmp_path / "state"),
                   "audit-dir": str(tmp_path / "audit"), "device": "cpu", "threads": 1}
    if idle_release is not None:
        node_config["idle-release"] = idle_release
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(RUN))
    msg = Message(content=RecordDict({"arrays": pack(model.state_dict()),
                                      "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    try:
        reply = task.handle_train(msg, ctx)
    finally:
        task.release_after(ctx)
    assert not reply.has_error()
    return unpack(reply.content["arrays"], Layout.of(model.state_dict()))


def test_release_drops_the_model_and_the_maps_and_the_next_round_trains_identically(tmp_path, site):
    task._RESIDENT.clear()
    try:
        first = _round(tmp_path / "kept", site, 2, "off")
        kept_model = task._RESIDENT["model"][1]
        site_data = task._RESIDENT["site"][1]
        maps = site_data.images._maps if isinstance(site_data.images, StoreView) else None
        assert maps is None or maps  # off: all stays resident
        again = _round(tmp_path / "kept", site, 2, "off")
        assert task._RESIDENT["model"][1] is kept_model

        task._RESIDENT.clear()
        released = _round(tmp_path / "released", site, 2, None)  # default: on
        assert "model" not in task._RESIDENT
        images = task._RESIDENT["site"][1].images  # the site's index stays (no rescan), a StoreView's maps close
        assert isinstance(images, np.memmap) or (isinstance(images, StoreView) and not images._maps)
        after = _round(tmp_path / "released", site, 2, "on")  # the next round rebuilds what was let go
        for key, value in first.items():
            for other in (again, released, after):
                np.testing.assert_array_equal(value, other[key], err_msg=key)
    finally:
        task._RESIDENT.clear()


def test_release_drops_site_data_held_in_memory():
    from fedrad.client.site.site_data import SiteData

    task._RESIDENT.clear()
    task._RESIDENT["site"] = (("k",), SiteData(images=np.zeros((2, 4, 4), np.uint16), paths=["a", "b"],
                                                 patient_keys=["p", "q"], labels={}))
    task._RESIDENT["model"] = (("m",), object())
    assert task.release_idle() == {"model": 1, "maps": 0, "site": 1}
    assert task._RESIDENT == {}
    assert task.release_idle() == {"model": 0, "maps": 0, "site": 0}


def test_store_view_release_closes_maps_and_reads_again(tmp_path):
    from fedrad.client.site.site_data import SiteData

    rows = np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3)
    rows.tofile(tmp_path / "c0")
    view = StoreView(tmp_path, 3, ["c0"], [2], np.zeros(2, np.int32), np.arange(2))
    before = view[1]
    assert view.release() == 1 and view.release() == 0
    np.testing.assert_array_equal(view[1], before)
    task._RESIDENT.clear()
    site = SiteData(images=view, paths=["a", "b"], patient_keys=["p", "q"], labels={})
    task._RESIDENT["site"] = (("k",), site)
    try:
        assert task.release_idle() == {"model": 0, "maps": 1, "site": 0}
        assert task._RESIDENT["site"][1] is site and not view._maps  # the index stays, the map is closed
        np.testing.assert_array_equal(view[1], before)
    finally:
        task._RESIDENT.clear()


@pytest.mark.parametrize("value,expected", [("on", True), ("off", False), ("true", True), ("FALSE", False),
                                            ("1", True), ("0", False), (True, True), (False, False), ("", True)])
def test_idle_release_switch_is_validated(value, expected):
    node = NodeConfig.of({"idle-release": value})
    assert node.idle_release is expected
    assert NodeConfig.of(node.to_flower()).idle_release is expected
    assert NodeConfig.of({}).idle_release is True


@pytest.mark.parametrize("value", ["maybe", "2", 3])
def test_a_bad_idle_release_names_its_key(value):
    with pytest.raises(ValueError, match="node-config 'idle-release'"):
        NodeConfig.of({"idle-release": value})


def test_fedrad_node_keep_resident_turns_idle_release_off(tmp_path, monkeypatch):
    """`fedrad node --keep-resident` hands the SuperNode node-config idle-release = off; without it the key is
    unset (the default: on)."""
    from fedrad.deploy import cli, processes

    seen: list[dict] = []
    monkeypatch.setattr(processes, "supernode_command", lambda _link, _port, config, *a, **k: seen.append(config)
                        or ["true"])
    monkeypatch.setattr(processes, "_run_foreground", lambda *a, **k: 0)
    (tmp_path / "data").mkdir()
    base = ["node", "--data", str(tmp_path / "data"), "--allow-unsigned", "--no-scan",
            "--state-dir", str(tmp_path / "state")]
    for extra in ([], ["--keep-resident"]):
        assert cli.main(base + extra) == 0
    assert "idle-release" not in seen[0] and NodeConfig.of(seen[0]).idle_release is True
    assert seen[1]["idle-release"] == "off" and NodeConfig.of(seen[1]).idle_release is False
