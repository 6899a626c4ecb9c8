"""Server pieces without processes: checkpoints round-trip exactly, screening rejects what it should."""

from __future__ import annotations

import numpy as np
import pytest
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.screening import screen_replies
from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict


def _arrays(scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord({
        "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3) * scale),
        "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
        "b": Array(np.ones(3, dtype=np.float32) * scale),
    })


class _FakeFedOptState:
    """Holds the attributes Flower's FedOpt strategies keep between rounds."""

    def __init__(self) -> None:
        self.current_arrays = {"w": np.ones((2, 3), np.float32)}
        self.m_t = {"w": np.full((2, 3), 0.5, np.float32)}
        self.v_t = None


def test_checkpoint_round_trip_keeps_shapes_dtypes_order_and_state(tmp_path):
    arrays = _arrays()
    save_checkpoint(tmp_path, 1, arrays, _FakeFedOptState(), {"array_order": list(arrays.keys())})
    save_checkpoint(tmp_path, 2, _arrays(2.0), _FakeFedOptState(), {"array_order": list(arrays.keys())})
    assert latest_checkpoint(tmp_path).name == "round-0002.safetensors"
    restored = _FakeFedOptState()
    restored.m_t = None
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "round-0001.safetensors", restored)
    assert ckpt.server_round == 1
    assert list(ckpt.arrays.keys()) == list(arrays.keys())
    for key, arr in arrays.items():
        got = ckpt.arrays[key].numpy()
        assert got.shape == arr.numpy().shape and got.dtype == arr.numpy().dtype
        np.testing.assert_array_equal(got, arr.numpy())
    np.testing.assert_array_equal(restored.m_t["w"], np.full((2, 3), 0.5, np.float32))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def _reply(node: int, arrays: ArrayRecord) -> Message:
    """A train reply as the SuperLink delivers it to the ServerApp (source = the site's node id)."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=RecordDict({"arrays": arrays}), metadata=meta)


@pytest.mark.parametrize("bad, reason", [
    (ArrayRecord({"w": Array(np.full((2, 3), np.nan, np.float32)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "NaN"),
    (ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "shape"),
    (ArrayRecord({"w": Array(np.zeros((2, 3), np.float64)),
                  "bn.num_batches_tracked": Array(np.array(7, np.int64)),
                  "b": Array(np.ones(3, np.float32))}), "dtype"),
    (_arrays(1000.0), "update norm"),
])
def test_screening_rejects_bad_updates(bad, reason):
    global_arrays = _arrays(1.0)
    replies = [_reply(1, _arrays(1.01)), _reply(2, _arrays(0.99)), _reply(3, bad)]
    kept, report = screen_replies(replies, global_arrays, outlier_factor=10.0)
    assert [int(m.metadata.src_node_id) for m in kept] == [1, 2]
    assert reason in report.rejected[3]
