"""Per-round checkpoints of a run: global arrays, strategy state and the round number, written atomically.

A checkpoint is `checkpoints/round-NNNN.safetensors` (global model arrays plus the strategy's own state,
e.g. FedAdam's moments, under `strategy/...` keys) with a JSON header in the safetensors metadata.
`latest_checkpoint` finds the newest complete one, so `fedrad run --resume` continues after a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedrad.common.atomic import atomic_write

# Strategy attributes that carry state from round to round in Flower's strategies.
_STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
_NAME = re.compile(r"round-(\d{4,})\.safetensors$")


@dataclass
class Checkpoint:
    server_round: int
    arrays: ArrayRecord
    info: dict


def _flatten_state(strategy) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            kinds[attr] = "arrayrecord"
            items = {k: v.numpy() for k, v in value.items()}
        elif isinstance(value, dict):
            kinds[attr] = "dict"
            items = dict(value)
        elif isinstance(value, list):
            kinds[attr] = "list"
            items = {str(i): v for i, v in enumerate(value)}
        else:
            continue
        for key, arr in items.items():
            tensors[f"strategy/{attr}/{key}"] = np.array(arr, order="C", copy=True)
    return tensors, kinds


def _restore_state(strategy, tensors: dict[str, np.ndarray], kinds: dict[str, str]) -> None:
    for attr, kind in kinds.items():
        prefix = f"strategy/{attr}/"
        items = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if kind == "arrayrecord":
            value: object = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif kind == "dict":
            value = items
        else:
            value = [items[str(i)] for i in range(len(items))]
        setattr(strategy, attr, value)


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy, info: dict,
                    keep: int = 0) -> Path:
    """Write round `server_round`'s checkpoint atomically, then keep only the newest `keep` (0: all)."""
    from safetensors.numpy import save_file

    tensors = {f"model/{k}": np.array(v.numpy(), order="C", copy=True) for k, v in arrays.items()}
    state, kinds = _flatten_state(strategy)
    tensors.update(state)
    header = {"server_round": server_round, "strategy_kinds": kinds, "info": info}
    path = Path(run_dir) / "checkpoints" / f"round-{server_round:04d}.safetensors"
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"fedrad": json.dumps(header)}))
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (by round number; the latest is always kept, and
    only after the new one is renamed into place, so a crash never leaves no checkpoint). The removed paths."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name)))
    removed = [p for _, p in found[: max(0, len(found) - max(1, keep))]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name)))
    return found[-1][1] if found else None


def load_checkpoint(path: Path, strategy=None) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as fh:
        header = json.loads((fh.metadata() or {})["fedrad"])
    tensors = load_file(str(path))
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    # Keep the state-dict order the model uses (safetensors sorts keys): the header remembers it.
    order = header["info"].get("array_order") or list(model)
    arrays = ArrayRecord({k: Array(model[k]) for k in order})
    if strategy is not None:
        _restore_state(strategy, tensors, header.get("strategy_kinds", {}))
    return Checkpoint(int(header["server_round"]), arrays, header["info"])
