"""fedrad's wire format for a model: its state dict packed into one flat array per dtype.

Flower 1.41 moves a Message as a tree of objects (record, each Array, each 5 MiB chunk), one HTTP call per
object, two at a time, on every leg (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A state
dict of ~100-300 arrays therefore costs hundreds of calls per message. Packed, the same weights are one
1-D array per dtype (`float32`, plus `int64` for BatchNorm's batch counters): a handful of objects.

Nothing else describes the layout on the wire: both sides derive it (`Layout`) from what they already hold
and trust, the coordinator from its global model, the site from the model its signed run config builds.
`unpack` accepts a record only when it is exactly that layout (names, dtypes, lengths), so a message that
is not the expected model is refused before any of it is used. Packing is exact: every value, integer
buffers included, comes back bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedrad.common.protocol import ProtocolError


class PackingError(ProtocolError):
    """A packed record (or an update list) is not the expected layout; the text names the group or key."""


def _dtype(value: Any) -> np.dtype:
    """numpy dtype of an ndarray, a Flower Array (its dtype string) or a torch tensor ("torch.float32")."""
    return np.dtype(str(value.dtype).removeprefix("torch."))


def _ndarray(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return value.numpy()
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class Layout:
    """A model's arrays in order: (name, shape, dtype). Packed, each dtype is one 1-D array holding its arrays
    raveled one after the other in this order; the groups come in the order their dtype first appears."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> Layout:
        """The layout of a state dict, an ArrayRecord (read from its metadata, nothing decoded) or named ndarrays."""
        return cls(tuple((str(k), tuple(int(d) for d in v.shape), _dtype(v).name) for k, v in arrays.items()))

    def ints_as_float32(self) -> Layout:
        """The same arrays with integer ones as float32 (plain dp=client: Flower's clipping scales every array)."""
        return Layout(tuple((k, s, "float32" if np.dtype(d).kind in "iu" else d) for k, s, d in self.entries))

    @cached_property
    def groups(self) -> dict[str, int]:
        """dtype name -> element count of its packed array, in packing order."""
        out: dict[str, int] = {}
        for _, shape, dtype in self.entries:
            out[dtype] = out.get(dtype, 0) + _size(shape)
        return out

    @property
    def keys(self) -> list[str]:
        return [k for k, _, _ in self.entries]


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def pack(arrays: Mapping[str, Any], layout: Layout | None = None) -> ArrayRecord:
    """The packed record of `arrays` (ndarrays, torch tensors or Flower Arrays) under `layout` (default: their
    own). Values are cast to the layout's dtype only where numpy calls that same-kind (int -> float, float64 ->
    float32), never float -> int; names and shapes must be the layout's."""
    layout = layout or Layout.of(arrays)
    if list(arrays.keys()) != layout.keys:
        missing = sorted(set(layout.keys) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(layout.keys))[:3]
        raise PackingError(f"arrays are not the layout's (missing {missing}, extra {extra}, or out of order)")
    parts: dict[str, list[np.ndarray]] = {g: [] for g in layout.groups}
    for key, shape, dtype in layout.entries:
        value = _ndarray(arrays[key])
        if tuple(value.shape) != shape:
            raise PackingError(f"'{key}' has shape {tuple(value.shape)}, the layout's is {shape}")
        try:
            parts[dtype].append(value.astype(dtype, casting="same_kind", copy=False).ravel())
        except TypeError:
            raise PackingError(f"'{key}' is {value.dtype}, which does not pack as {dtype}") from None
    return ArrayRecord({g: Array(np.concatenate(p)) for g, p in parts.items()})


def unpack(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """Named read-only arrays (views into the record's own bytes, nothing copied) of a packed record that is
    exactly `layout`: the groups' names, order, dtypes and lengths are checked before any array is read."""
    if list(record.keys()) != list(layout.groups):
        raise PackingError(f"packed arrays {list(record.keys())[:4]} are not the model's {list(layout.groups)}")
    for group, count in layout.groups.items():
        meta = record[group]
        if str(meta.dtype) != group or tuple(meta.shape) != (count,):
            raise PackingError(f"packed '{group}' is {tuple(meta.shape)} {meta.dtype}, "
                               f"the model's is ({count},) {group}")
    buffers = []
    for group, count in layout.groups.items():
        flat = _flat_view(record[group], group)
        if flat.dtype != np.dtype(group) or flat.shape != (count,):  # the data itself, not only its metadata
            raise PackingError(f"packed '{group}' holds {flat.shape} {flat.dtype}, the model's is ({count},) {group}")
        buffers.append(flat)
    return split(buffers, layout)


def _flat_view(array: Array, group: str) -> np.ndarray:
    """A read-only view of a packed Array's .npy bytes (numpy's own header reader, no copy of the data), so
    unpacking a reply adds nothing to the bytes Flower already holds. Anything but a 1-D little-endian C
    array of exactly its data is refused."""
    import io

    from numpy.lib import format as npy

    if array.stype != "numpy.ndarray":
        raise PackingError(f"packed '{group}' is serialised as {array.stype!r}, not numpy.ndarray")
    head = io.BytesIO(array.data)
    try:
        version = npy.read_magic(head)
        shape, fortran, dtype = (npy.read_array_header_1_0(head) if version == (1, 0)
                                 else npy.read_array_header_2_0(head))
    except ValueError as exc:
        raise PackingError(f"packed '{group}' is not a .npy array ({exc})") from None
    if fortran or len(shape) != 1 or dtype.hasobject or not dtype.isnative:
        raise PackingError(f"packed '{group}' is not a flat native {group} array")
    offset = head.tell()
    if len(array.data) - offset != shape[0] * dtype.itemsize:
        raise PackingError(f"packed '{group}' holds {len(array.data) - offset} bytes for {shape[0]} values")
    return np.frombuffer(array.data, dtype=dtype, count=shape[0], offset=offset)


def split(buffers: Sequence[np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """Named views of packed buffers given in group order, whatever their dtype (SecAgg+'s summed update is
    float for every group): only the number of buffers and their lengths are checked."""
    if len(buffers) != len(layout.groups):
        raise PackingError(f"{len(buffers)} packed arrays, the model has {len(layout.groups)}")
    flat = {}
    for (group, count), buf in zip(layout.groups.items(), buffers, strict=True):
        buf = np.asarray(buf)
        if buf.size != count:
            raise PackingError(f"packed '{group}' holds {buf.size} values, the model has {count}")
        flat[group] = buf.reshape(-1)
    out: dict[str, np.ndarray] = {}
    offsets = dict.fromkeys(layout.groups, 0)
    for key, shape, dtype in layout.entries:
        start, n = offsets[dtype], _size(shape)
        out[key] = flat[dtype][start:start + n].reshape(shape)
        offsets[dtype] = start + n
    return out
