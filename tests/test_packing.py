"""fedrad's wire format (common/packing.py) on real models: exact round trips, strict layouts, and the site's
handler refusing a message that is not exactly its model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedrad.common.models import build_model
from fedrad.common.packing import Layout, PackingError, pack, split, unpack
from fedrad.common.run_config import RunConfig


def _trained_bn_state() -> dict[str, torch.Tensor]:
    """A BatchNorm model's state dict with moved running stats and non-zero batch counters."""
    torch.manual_seed(0)
    model = build_model("test_resnet", "simclr", 32, proj_dim=32)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 32, 32))
    return model.state_dict()


def test_real_model_round_trips_exactly_in_a_handful_of_arrays():
    state = _trained_bn_state()
    layout = Layout.of(state)
    ints = [k for k, v in state.items() if not v.is_floating_point()]
    assert ints and all(int(state[k]) == 3 for k in ints)  # num_batches_tracked moved
    record = pack(state)
    assert list(record.keys()) == ["float32", "int64"]  # ~100 state-dict entries -> 2 wire arrays
    assert len(state) > 50
    assert record["float32"].shape == (sum(v.numel() for v in state.values() if v.is_floating_point()),)
    back = unpack(record, layout)
    assert list(back) == list(state)
    for key, value in state.items():
        got = back[key]
        assert got.shape == tuple(value.shape) and got.dtype == value.numpy().dtype, key
        assert got.tobytes() == value.numpy().tobytes(), key  # bit for bit
    # a record's own layout (metadata only) is the same, so a receiver never needs it from the wire
    assert Layout.of(ArrayRecord(state)) == layout
    # the wire bytes of a packed Flower Array survive its own serialisation too
    again = unpack(ArrayRecord({g: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
                                for g, a in record.items()}), layout)
    assert all(np.array_equal(again[k], back[k]) for k in state)


def test_ints_as_float32_layout_for_plain_client_dp():
    state = _trained_bn_state()
    layout = Layout.of(state).ints_as_float32()
    assert list(layout.groups) == ["float32"]
    back = unpack(pack(state, layout), layout)
    for key, value in state.items():
        assert back[key].dtype == np.float32 and np.array_equal(back[key], value.numpy().astype(np.float32))
    with pytest.raises(PackingError):  # never float -> int
        pack({k: v.float() for k, v in state.items()}, Layout.of(state))


@pytest.mark.parametrize("why, record", [
    ("too long", lambda r: ArrayRecord({"float32": Array(np.zeros(r["float32"].shape[0] + 1, np.float32)),
                                        "int64": r["int64"]})),
    ("too short", lambda r: ArrayRecord({"float32": Array(np.zeros(r["float32"].shape[0] - 1, np.float32)),
                                         "int64": r["int64"]})),
    ("wrong dtype", lambda r: ArrayRecord({"float32": r["float32"],
                                           "int64": Array(np.zeros(r["int64"].shape, np.int32))})),
    ("out of order", lambda r: ArrayRecord({"int64": r["int64"], "float32": r["float32"]})),
    ("a group missing", lambda r: ArrayRecord({"float32": r["float32"]})),
    ("an extra group", lambda r: ArrayRecord({**dict(r.items()), "uint8": Array(np.zeros(8, np.uint8))})),
    ("2-D instead of flat", lambda r: ArrayRecord({"float32": Array(r["float32"].numpy().reshape(-1, 2)),
                                                   "int64": r["int64"]})),
    ("metadata lies about the data", lambda r: ArrayRecord({
        "float32": Array(dtype="float32", shape=r["float32"].shape, stype=r["float32"].stype,
                         data=Array(np.zeros(5, np.float32)).data), "int64": r["int64"]})),
    ("named arrays, not packed", lambda r: ArrayRecord(_trained_bn_state())),
])
def test_unpack_refuses_anything_but_the_layout(why, record):
    state = _trained_bn_state()
    with pytest.raises(PackingError):
        unpack(record(pack(state)), Layout.of(state))


def test_split_reads_a_float_sum_of_the_packed_model():
    layout = Layout.of({"a": np.zeros((2, 2), np.float32), "n": np.array(0, np.int64), "b": np.zeros(3, np.float32)})
    out = split([np.arange(7, dtype=np.float64), np.array([9.0])], layout)
    assert out["a"].tolist() == [[0, 1], [2, 3]] and out["b"].tolist() == [4, 5, 6] and float(out["n"]) == 9.0
    with pytest.raises(PackingError):
        split([np.arange(6.0), np.array([9.0])], layout)


def test_site_refuses_a_message_that_is_not_its_model():
    """The handler loads weights only from exactly the layout its run config builds."""
    from fedrad.client.app import task

    cfg = RunConfig(model="test_resnet", objective="simclr", image_size=32, proj_dim=32)
    other = build_model("test_resnet", "byol", 32, proj_dim=32).state_dict()  # + a predictor head
    task._RESIDENT.clear()
    try:
        with pytest.raises(PackingError):
            task._model_from(SimpleNamespace(content=RecordDict({"arrays": pack(other)})), cfg, run_id=1)
        state = _trained_bn_state()
        model, received, layout = task._model_from(SimpleNamespace(content=RecordDict({"arrays": pack(state)})),
                                                   cfg, run_id=1)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        reply = task._reply_arrays(model, received, layout, cfg)  # what goes back: the same layout, exactly
        assert Layout.of(reply) == Layout.of(pack(state))
        assert all(np.array_equal(v, state[k].numpy()) for k, v in unpack(reply, layout).items())
    finally:
        task._RESIDENT.clear()
