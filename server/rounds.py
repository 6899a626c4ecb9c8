"""The round loop: Flower's strategy does sampling and aggregation; fedrad adds screening, a checkpoint
and a metrics line after every round, plots, resume from the last checkpoint, and the final weights.

This mirrors `Strategy.start` of flwr 1.41 (configure -> send_and_receive -> aggregate, train then
evaluate) but starts at an arbitrary round, which `Strategy.start` cannot, so a crashed run resumes.
"""

from __future__ import annotations

import time
import uuid
from logging import INFO, WARNING
from pathlib import Path

from fedrad.common.atomic import atomic_write_json
from fedrad.common.protocol import ErrorCode
from fedrad.common.run_config import RunConfig
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.privacy import PrivacyLedger, check_privacy_config, privacy_summary, wrap_dp_strategy
from fedrad.server.run_log import append_metrics, plot_run, read_metrics, truncate_metrics
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
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    return ArrayRecord(model.state_dict())


def _float_buffers(arrays: ArrayRecord) -> ArrayRecord:
    """Under dp=client the integer buffers travel as float32 (Flower's clipping scales every array)."""
    import numpy as np
    from flwr.app import Array

    return ArrayRecord({k: Array(v.numpy().astype(np.float32)) if v.numpy().dtype.kind in "iu" else v
                        for k, v in arrays.items()})


def save_global_backbone(arrays: ArrayRecord, cfg: RunConfig, run_dir: Path, rounds_done: int) -> Path:
    """Write the backbone alone as safetensors that timm loads with in_chans=1, num_classes=0."""
    from fedrad.common.models import build_model, save_backbone

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    meta = {"model": cfg.model, "in_chans": "1", "image_size": str(cfg.image_size),
            "objective": cfg.objective, "rounds": str(rounds_done), "norm": cfg.model_norm}
    path = run_dir / "global.safetensors"
    save_backbone(model.backbone, path, meta)
    return path


def resolve_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    return (Path.cwd() / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()


def run_federation(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(dict(context.run_config))
    check_privacy_config(cfg)
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    strategy = build_strategy(cfg)

    start_round = 1
    privacy_rounds: list = []
    # Names this run to the sites across resumes (Flower gives a resumed run a new run id): a site keys its
    # sample-DP ledger by it, so a resumed run keeps adding to the same epsilon.
    run_key = uuid.uuid4().hex
    ckpt_path = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, strategy)
        arrays, start_round = ckpt.arrays, ckpt.server_round + 1
        privacy_rounds = list(ckpt.info.get("privacy_rounds", []))
        run_key = str(ckpt.info.get("run_key") or run_key)
        truncate_metrics(run_dir, ckpt.server_round)
        log(INFO, "fedrad: resuming %s after round %d (checkpoint %s)", run_dir, ckpt.server_round, ckpt_path.name)
    else:
        if cfg.resume:
            log(WARNING, "fedrad: --resume asked but %s has no checkpoint: starting at round 1", run_dir)
        arrays = initial_arrays(cfg)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.dp == "client" and not cfg.secagg:
        arrays = _float_buffers(arrays)
    array_order = list(arrays.keys())
    atomic_write_json(run_dir / "run.json", {
        "run_id": context.run_id, "config": dict(context.run_config), "started": time.time(),
        "start_round": start_round, "run_key": run_key,
    })
    log(INFO, "fedrad: %s with %s, objective %s, model %s, %d rounds -> %s", type(strategy).__name__,
        cfg.strategy, cfg.objective, cfg.model, cfg.num_server_rounds, run_dir)

    ledger = None
    if cfg.dp == "client":
        ledger = PrivacyLedger.for_run(cfg, max(cfg.min_available_nodes, len(list(grid.get_node_ids()))))
        ledger.restore(privacy_rounds)
    plain_dp = cfg.dp == "client" and not cfg.secagg
    train_strategy = wrap_dp_strategy(strategy, cfg, cfg.min_train_nodes) if plain_dp else strategy
    secagg = None
    if cfg.secagg:
        from fedrad.server.secagg import SecAggTrainer

        secagg = SecAggTrainer(grid, context, cfg)
    stopped = "completed"
    rounds_done = start_round - 1
    try:
        rounds_done, stopped, arrays = _round_loop(grid, cfg, run_dir, strategy, train_strategy, secagg, ledger,
                                                   arrays, array_order, start_round, run_key)
    finally:
        if secagg is not None:
            secagg.close()

    weights = save_global_backbone(arrays, cfg, run_dir, rounds_done)
    sites_seen = len({n for r in read_metrics(run_dir) for n in (r.get("sites") or {})})
    site_eps = {n: m["dp_epsilon"] for r in read_metrics(run_dir) for n, m in (r.get("sites") or {}).items()
                if "dp_epsilon" in m}
    atomic_write_json(run_dir / "summary.json", {
        "rounds": rounds_done, "rounds_planned": cfg.num_server_rounds, "stopped": stopped,
        "finished": time.time(), "global_weights": weights.name, "config": dict(context.run_config),
        "privacy": privacy_summary(cfg, ledger, rounds_done, sites_seen, site_eps),
    })
    log(INFO, "fedrad: run finished (%s); global backbone %s, metrics %s", stopped, weights,
        run_dir / "metrics.jsonl")


def _sample_dp_stop(cfg: RunConfig, run_dir: Path, rnd: int) -> str | None:
    """dp=sample: the reason to stop before round `rnd`, when a site's projected ε would pass the budget."""
    if cfg.dp != "sample" or cfg.dp_epsilon_budget <= 0:
        return None
    rows = read_metrics(run_dir)
    if not rows:
        return None
    nxt = [float(m["dp_epsilon_next"]) for m in (rows[-1].get("sites") or {}).values() if "dp_epsilon_next" in m]
    if nxt and max(nxt) > cfg.dp_epsilon_budget:
        return (f"dp-epsilon-budget {cfg.dp_epsilon_budget:g} reached: round {rnd} would bring a site's image-level "
                f"epsilon to {max(nxt):.4f} (delta {cfg.dp_delta:g}); stopped after round {rnd - 1}")
    return None


def _budget_refusals(replies: list[Message]) -> bool:
    """Every error is a site refusing because its own DP budget would be exceeded."""
    errors = [m for m in replies if m.has_error()]
    return bool(errors) and all(m.error.code == ErrorCode.PRIVACY_BUDGET for m in errors)


def _round_loop(grid, cfg, run_dir, strategy, train_strategy, secagg, ledger, arrays, array_order,
                start_round, run_key):
    rounds_done = start_round - 1
    for rnd in range(start_round, cfg.num_server_rounds + 1):
        t0 = time.time()
        why = _sample_dp_stop(cfg, run_dir, rnd)
        if why:
            log(WARNING, "fedrad: %s", why)
            return rounds_done, why, arrays
        if ledger is not None:
            available = len(list(grid.get_node_ids()))
            expected = max(int(available * cfg.fraction_train), cfg.min_train_nodes)
            exceed, eps_next = ledger.would_exceed(expected)
            if exceed:
                why = (f"dp-epsilon-budget {cfg.dp_epsilon_budget:g} reached: round {rnd} would bring epsilon "
                       f"from {ledger.epsilon:.4f} to {eps_next:.4f} (delta {cfg.dp_delta:g}); stopped after "
                       f"round {rnd - 1}")
                log(WARNING, "fedrad: %s", why)
                return rounds_done, why, arrays
        log(INFO, "fedrad: [round %d/%d] sending the global model to the sites", rnd, cfg.num_server_rounds)
        privacy_entry: dict = {}
        if secagg is not None:
            res = secagg.train_round(rnd, arrays)
            arrays, agg_train, report, agg_arrays = res.arrays, res.metrics, None, res.arrays
            n_sent, answered, aggregated = res.sampled, res.aggregated, res.aggregated
            train_replies: list[Message] = []
            secagg_sites = res.site_metrics
        else:
            train_msgs = list(train_strategy.configure_train(
                rnd, arrays, ConfigRecord({"server-round": rnd, "run-key": run_key}), grid))
            if train_strategy is not strategy:
                train_strategy.num_sampled_clients = max(1, len(train_msgs))
            train_replies = list(grid.send_and_receive(messages=train_msgs, timeout=cfg.round_timeout))
            ok = [m for m in train_replies if not m.has_error()]
            if train_msgs and not ok and _budget_refusals(train_replies):
                why = (f"dp-epsilon-budget {cfg.dp_epsilon_budget:g} reached: every site refused round {rnd} "
                       f"(its image-level epsilon would pass the budget); stopped after round {rnd - 1}")
                log(WARNING, "fedrad: %s", why)
                return rounds_done, why, arrays
            if train_msgs and not ok:
                reasons = sorted({m.error.reason for m in train_replies if m.has_error()})[:3]
                raise RuntimeError(f"round {rnd}: none of {len(train_msgs)} sites returned a result "
                                   f"({'; '.join(reasons) or 'no replies'}): refusing to go on training nothing")
            strategy.last_report = None
            agg_arrays, agg_train = train_strategy.aggregate_train(rnd, train_replies)
            report = strategy.last_report
            if agg_arrays is not None:
                arrays = agg_arrays
            n_sent, answered = len(train_msgs), len(ok)
            aggregated = len(report.accepted) if report and agg_arrays is not None else 0
            secagg_sites = None
        if ledger is not None:
            eps = ledger.record(rnd, n_sent, aggregated if agg_arrays is not None else 0)
            privacy_entry = {"dp_epsilon": eps, "dp_delta": cfg.dp_delta}
        eval_msgs = strategy.configure_evaluate(rnd, arrays, ConfigRecord({"server-round": rnd}), grid)
        eval_replies = list(grid.send_and_receive(messages=eval_msgs, timeout=cfg.round_timeout))
        agg_eval = strategy.aggregate_evaluate(rnd, eval_replies)

        site_keys = ("train_loss", "train_loss_first", "num-examples", "examples_seen", "steps", "seconds",
                     "dp_epsilon", "dp_epsilon_next")
        sites = _site_metrics(train_replies, site_keys)
        if secagg_sites is not None:
            sites = {n: {k: v for k, v in m.items() if k in ("train_loss", "train_loss_first", "num-examples",
                                                             "steps", "seconds")} for n, m in secagg_sites.items()}
        for node, m in _site_metrics(eval_replies, ("eval_loss", "alignment", "uniformity")).items():
            sites.setdefault(node, {}).update(m)
        entry = {
            "round": rnd,
            "sites_answered": answered,
            "sites_aggregated": aggregated,
            "secagg": bool(cfg.secagg),
            "rejected": {str(k): v for k, v in (report.rejected if report else {}).items()},
            "aggregated": agg_arrays is not None,
            "sites": sites,
        }
        for key, value in (agg_train or {}).items():
            entry[key] = value
        for key, value in (agg_eval or {}).items():
            entry[key] = value
        entry.update(privacy_entry)
        if cfg.dp == "sample":
            # The strategy averaged the sites' ε like any metric; the honest number is the worst site's.
            site_eps = [m["dp_epsilon"] for m in sites.values() if "dp_epsilon" in m]
            entry.pop("dp_epsilon_next", None)
            entry["dp_epsilon"] = max(site_eps) if site_eps else None
            entry["dp_delta"] = cfg.dp_delta
        # Set last: the sites' aggregated metrics carry their own "seconds" (local work per site).
        entry["round_seconds"] = round(time.time() - t0, 3)
        info = {"array_order": array_order, "time": time.time(), "run_key": run_key}
        if ledger is not None:
            info["privacy_rounds"] = ledger.rounds
        save_checkpoint(run_dir, rnd, arrays, strategy, info)
        append_metrics(run_dir, entry)
        plot_run(run_dir)
        log(INFO, "fedrad: [round %d/%d] %d/%d sites aggregated, train loss %s, held-out loss %s (%.1fs)",
            rnd, cfg.num_server_rounds, entry["sites_aggregated"], n_sent, _fmt(entry.get("train_loss")),
            _fmt(entry.get("eval_loss")), entry["round_seconds"])
        rounds_done = rnd
    return rounds_done, "completed", arrays


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"



