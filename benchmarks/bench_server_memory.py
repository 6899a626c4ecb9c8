"""Coordinator memory: peak RSS of the ServerApp's train-reply path (screening + aggregation) for 10 sites, resnet50.

    .venv/bin/python benchmarks/bench_server_memory.py [--model resnet50] [--sites 10]

What is measured: not 10 SuperNodes (10 training resnet50 processes do not fit a 2-core box), but the code the
ServerApp runs on a round's train replies, in a fresh Python process per path with the ServerApp's imports
(torch, timm, Flower): the global model is resnet50's real state_dict (fedrad's `initial_arrays`, as
`build_model` makes it), each site's reply is a Flower Message holding that model moved by its own random
update (numpy arrays serialised into Flower Arrays, as a pulled reply is) with site metrics. Peak RSS is
psutil's RSS sampled every 2 ms (`baseline`: after the imports and the global model are resident), from
before the replies arrive to the aggregate. Paths, each in its own process:

- `list, before`: every reply in memory (as `exchange` returns them), `screen_replies` + Flower's
  `aggregate_train` (the implementation before streaming);
- `list, streamed`: every reply in memory, then `screen_stream` + `aggregate_screened` (today's PlainRounds);
- `arriving, streamed`: replies handed over one at a time as they arrive (a generator stands in for an
  exchange that yields each pulled reply), `screen_stream` + `aggregate_screened`;
- `pulled bytes, streamed`: as `arriving, streamed`, but each reply is written to disk as its serialised
  Array bytes before the baseline is taken, and arrives as a pulled reply does: the bytes read back into
  Flower Arrays, nothing else built. This separates what screening and aggregation hold from what the
  `arriving` path's reply generator holds while it makes a reply (moved arrays, their packing, np.save's copy).

Goal (issue 13): peak RSS <= 3x the model's bytes; the row gives the round's peak above the baseline
(what aggregation adds) and the absolute peak, both in model copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PATHS = ("list, before", "list, streamed", "arriving, streamed", "pulled bytes, streamed")
SPILL_PATHS = PATHS[2:]  # the spill-updates paths, whose goal is <= 3x the model above the baseline


def _replies(global_arrays, n: int, seed: int):
    """Site replies, made one at a time: the global model moved by each site's own update."""
    import numpy as np
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from fedrad.common.packing import pack

    for node in range(1, n + 1):
        rng = np.random.default_rng(seed + node)
        arrays = {}
        for key, arr in global_arrays.items():
            value = arr.numpy()
            if value.dtype.kind == "f":
                value = value + (0.01 * rng.standard_normal(value.shape, dtype=np.float32)).astype(value.dtype)
            arrays[key] = np.asarray(value)
            del value
        arrays = pack(arrays)  # as a site sends it: fedrad's wire format
        meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        metrics = MetricRecord({"num_examples": float(rng.integers(200, 400)), "train_loss": float(rng.random())})
        yield Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), metadata=meta)
        del arrays


def _write_pulled(global_arrays, n: int, folder: Path) -> list[Path]:
    """Each reply's Arrays as the bytes a pull delivers (dtype, shape, stype, data), one file per reply."""
    import pickle

    files = []
    for i, message in enumerate(_replies(global_arrays, n, 0)):
        record = message.content["arrays"]
        parts = {key: (a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for key, a in record.items()}
        metrics = dict(message.content["metrics"])
        path = folder / f"reply-{i}.pkl"
        with path.open("wb") as f:
            pickle.dump((message.metadata.src_node_id, parts, metrics), f, protocol=5)
        files.append(path)
        del message, record, parts
    return files


def _pulled(files: list[Path]):
    """Replies rebuilt from their pulled bytes, one at a time (what the ServerApp's pull hands screening)."""
    import pickle

    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    for path in files:
        with path.open("rb") as f:
            node, parts, metrics = pickle.load(f)
        arrays = ArrayRecord({key: Array(dtype=d, shape=shape, stype=st, data=data)
                              for key, (d, shape, st, data) in parts.items()})
        del parts
        meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        yield Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), metadata=meta)
        del arrays


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so the baseline is what is resident, not what was once used."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(args) -> dict:
    """One path in this (fresh) process; prints a JSON line."""
    import numpy as np
    import psutil

    from fedrad.common.run_config import RunConfig
    from fedrad.server.round_modes import screening_rules
    from fedrad.server.rounds import initial_arrays
    from fedrad.server.screening import UpdateSpill, drain, screen_replies, screen_stream
    from fedrad.server.strategies import build_strategy

    cfg = RunConfig(model=args.model, image_size=224, objective="simclr", min_train_nodes=args.sites)
    global_arrays, _ = initial_arrays(cfg)  # (arrays, init record)
    model_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in global_arrays.values())
    strategy = build_strategy(cfg)
    strategy.global_arrays = global_arrays
    rules = screening_rules(cfg)
    proc = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    path = args.child
    pulled_dir = tempfile.TemporaryDirectory()
    pulled = _write_pulled(global_arrays, args.sites, Path(pulled_dir.name)) if path.startswith("pulled") else []
    _trim()
    baseline = proc.memory_info().rss  # the ServerApp with its imports and the global model, before replies
    sampler = threading.Thread(target=sample, daemon=True)
    replies = list(_replies(global_arrays, args.sites, 0)) if path.startswith("list") else None
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if path == "list, before":
            kept, report = screen_replies(replies, global_arrays, rules)
            agg, _ = strategy.aggregate_train(1, kept)
            del kept
        else:
            if replies is not None:
                source = drain(replies)
            elif pulled:
                source = _pulled(pulled)
            else:
                source = _replies(global_arrays, args.sites, 0)
            with UpdateSpill(global_arrays, tmp) as spill:
                updates, report = screen_stream(source, global_arrays, rules, spill)
                agg, _ = strategy.aggregate_screened(1, updates, spill)
    seconds = time.perf_counter() - t0
    pulled_dir.cleanup()
    done.set()
    sampler.join()
    peak_rss = peak[0]
    assert agg is not None and len(report.accepted) == args.sites, report.rejected
    checksum = float(sum(float(np.abs(a.numpy()).sum()) for a in agg.values()))
    return {"path": path, "model_bytes": model_bytes, "baseline": baseline, "peak": peak_rss,
            "seconds": seconds, "checksum": checksum, "accepted": len(report.accepted)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--paths", default=";".join(PATHS), help="paths to run, separated by ';' (default: all)")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    from common_bench import bench_command, record_row

    rows = []
    for path in args.paths.split(";"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--sites", str(args.sites),
                              "--child", path], capture_output=True, text=True, env=dict(os.environ))
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(res)
        mb = res["model_bytes"]
        print(f"{path}: peak {res['peak'] / 2**20:.0f} MiB ({res['peak'] / mb:.2f}x model), above baseline "
              f"{(res['peak'] - res['baseline']) / 2**20:.0f} MiB ({(res['peak'] - res['baseline']) / mb:.2f}x), "
              f"{res['seconds']:.1f}s, checksum {res['checksum']:.6g}", flush=True)
    assert len({round(r["checksum"], 2) for r in rows}) == 1, "the paths disagree on the aggregate"
    mb = rows[0]["model_bytes"]
    ctx = {"command": bench_command(__file__), "model": args.model, "sites": args.sites,
           "model MiB": round(mb / 2**20)}
    for r in rows:
        above = r["peak"] - r["baseline"]
        text = (f"{r['peak'] / 2**20:.0f} MiB ({r['peak'] / mb:.1f}x) / +{above / 2**20:.0f} MiB "
                f"({above / mb:.1f}x), {r['seconds']:.1f}s")
        record_row("server_memory", f"{r['path']}: peak", round(r["peak"] / 2**20), "MiB", text=text, **ctx)
        record_row("server_memory", f"{r['path']}: above baseline / model bytes", round(above / mb, 1), "x",
                   goal="<= 3x" if r["path"] in SPILL_PATHS else None,
                   met=above / mb <= 3 if r["path"] in SPILL_PATHS else None, **ctx)
        record_row("server_memory", f"{r['path']}: baseline", round(r["baseline"] / 2**20), "MiB", **ctx)
        record_row("server_memory", f"{r['path']}: seconds", round(r["seconds"], 1), "s", **ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
