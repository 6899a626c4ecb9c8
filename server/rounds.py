"""The round loop: Flower's strategy does sampling and aggregation; fedrad adds screening, a checkpoint
and a metrics line after every round, plots, resume from the last checkpoint, and the final weights.

This mirrors `Strategy.start` of flwr 1.41 (configure -> send_and_receive -> aggregate, train then
evaluate) but starts at an arbitrary round, which `Strategy.start` cannot, so a crashed run resumes.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from fedrad.common.atomic import atomic_write_json
from fedrad.common.run_config import RunConfig
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.run_log import append_metrics, plot_run, truncate_metrics
from fedrad.server.strategies import build_strategy
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid


def _site_metrics(replies: list[Message], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per-site numeric metrics keyed by Flower node id (no site names, nothing from headers)."""
    out: dict[str, dict[str, float]] = {}
    for msg in replies:
        if msg.has_error() or "metrics" not in msg.content:
            continue
        m = msg.content["metrics"]
        out[str(msg.metadata.src_node_id)] = {k: float(m[k]) for k in keys if k in m}
    return out


def initial_arrays(cfg: RunConfig) -> ArrayRecord:
    import torch
    from fedrad.common.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim)
    return ArrayRecord(model.state_dict())


def save_global_backbone(arrays: ArrayRecord, cfg: RunConfig, run_dir: Path, rounds_done: int) -> Path:
    """Write the backbone alone as safetensors that timm loads with in_chans=1, num_classes=0."""
    from fedrad.common.models import build_model, save_backbone

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    meta = {"model": cfg.model, "in_chans": "1", "image_size": str(cfg.image_size),
            "objective": cfg.objective, "rounds": str(rounds_done)}
    path = run_dir / "global.safetensors"
    save_backbone(model.backbone, path, meta)
    return path


def resolve_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    return (Path.cwd() / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()


def run_federation(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(dict(context.run_config))
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    strategy = build_strategy(cfg)

    start_round = 1
    ckpt_path = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, strategy)
        arrays, start_round = ckpt.arrays, ckpt.server_round + 1
        truncate_metrics(run_dir, ckpt.server_round)
        log(INFO, "fedrad: resuming %s after round %d (checkpoint %s)", run_dir, ckpt.server_round, ckpt_path.name)
    else:
        if cfg.resume:
            log(WARNING, "fedrad: --resume asked but %s has no checkpoint: starting at round 1", run_dir)
        arrays = initial_arrays(cfg)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    array_order = list(arrays.keys())
    atomic_write_json(run_dir / "run.json", {
        "run_id": context.run_id, "config": dict(context.run_config), "started": time.time(),
        "start_round": start_round,
    })
    log(INFO, "fedrad: %s with %s, objective %s, model %s, %d rounds -> %s", type(strategy).__name__,
        cfg.strategy, cfg.objective, cfg.model, cfg.num_server_rounds, run_dir)

    for rnd in range(start_round, cfg.num_server_rounds + 1):
        t0 = time.time()
        log(INFO, "fedrad: [round %d/%d] sending the global model to the sites", rnd, cfg.num_server_rounds)
        train_msgs = strategy.configure_train(rnd, arrays, ConfigRecord({"server-round": rnd}), grid)
        train_replies = list(grid.send_and_receive(messages=train_msgs, timeout=cfg.round_timeout))
        agg_arrays, agg_train = strategy.aggregate_train(rnd, train_replies)
        report = strategy.last_report
        if agg_arrays is not None:
            arrays = agg_arrays
        eval_msgs = strategy.configure_evaluate(rnd, arrays, ConfigRecord({"server-round": rnd}), grid)
        eval_replies = list(grid.send_and_receive(messages=eval_msgs, timeout=cfg.round_timeout))
        agg_eval = strategy.aggregate_evaluate(rnd, eval_replies)

        sites = _site_metrics(train_replies, ("train_loss", "train_loss_first", "num-examples", "steps",
                                              "seconds"))
        for node, m in _site_metrics(eval_replies, ("eval_loss", "alignment", "uniformity")).items():
            sites.setdefault(node, {}).update(m)
        entry = {
            "round": rnd,
            "seconds": round(time.time() - t0, 3),
            "sites_answered": len([m for m in train_replies if not m.has_error()]),
            "sites_aggregated": len(report.accepted) if report else 0,
            "rejected": {str(k): v for k, v in (report.rejected if report else {}).items()},
            "aggregated": agg_arrays is not None,
            "sites": sites,
        }
        for key, value in (agg_train or {}).items():
            entry[key] = value
        for key, value in (agg_eval or {}).items():
            entry[key] = value
        save_checkpoint(run_dir, rnd, arrays, strategy, {"array_order": array_order, "time": time.time()})
        append_metrics(run_dir, entry)
        plot_run(run_dir)
        log(INFO, "fedrad: [round %d/%d] %d/%d sites aggregated, train loss %s, held-out loss %s (%.1fs)",
            rnd, cfg.num_server_rounds, entry["sites_aggregated"], len(train_msgs) if hasattr(train_msgs,
            "__len__") else entry["sites_answered"], _fmt(entry.get("train_loss")),
            _fmt(entry.get("eval_loss")), entry["seconds"])

    weights = save_global_backbone(arrays, cfg, run_dir, cfg.num_server_rounds)
    atomic_write_json(run_dir / "summary.json", {
        "rounds": cfg.num_server_rounds, "finished": time.time(), "global_weights": weights.name,
        "config": dict(context.run_config),
    })
    log(INFO, "fedrad: run finished; global backbone %s, metrics %s", weights, run_dir / "metrics.jsonl")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"



