"""The run: start or resume, one skeleton per round, the final weights and summary.json.

Every round is check -> train (the mode's configure -> send/receive -> screen -> aggregate; plain,
client-DP and SecAgg+ live in fedrad.server.round_modes) -> evaluate -> record -> checkpoint -> plots.
This mirrors `Strategy.start` of flwr 1.41 but starts at an arbitrary round, which `Strategy.start`
cannot, so a crashed run resumes. With fraction-evaluate = 0 no evaluate message is built or sent; with
eval-in-train = true neither: each site's train reply carries its held-out metrics of the global weights it
received (measured before training, so round r's `eval_loss` is that of the global model after round r - 1),
and they reach the round's line and its per-site records the way the evaluate replies' metrics do.

Where each round's time went, in its metrics.jsonl line (seconds, coordinator clock):
- `time_send`: configure (sampling, building messages) + push to the SuperLink, train and evaluate.
- `time_wait`: from the end of each push until its last reply (the slowest site) or the round timeout.
- `time_site_compute_max`: the slowest site's own train handler `seconds` (its SiteReport); evaluate replies
  carry no `seconds` (common/protocol.py), so with evaluate messages their site work counts in
  `time_overhead`; with eval-in-train it is part of the train handler's `seconds`.
- `time_aggregate`: screening + aggregation of the train and evaluate replies.
- `time_train`: the whole training half; under SecAgg+ Flower's workflow sends, waits and aggregates
  itself, so there `time_send` / `time_wait` / `time_aggregate` cover evaluation only.
- `time_checkpoint`: plot refresh + checkpoint (appending the line itself is not counted).
- `round_seconds`: the round's wall time, from its start to just before its line is appended.
- `time_overhead`: `round_seconds` - `time_site_compute_max`: what the federation costs above the slowest
  site's own work (messages, polling, process start at the site, aggregation, checkpoint).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrad.common.atomic import atomic_write_json
from fedrad.common.protocol import MESSAGE_EVALUATE, MONITOR, SERVER_ROUND, SITE_RECORD, metrics_for
from fedrad.common.run_config import RunConfig
from fedrad.server.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrad.server.exchange import RoundTimes, exchange
from fedrad.server.privacy import privacy_summary
from fedrad.server.round_modes import RoundStop, TrainOutcome, round_mode, screening_rules
from fedrad.server.run_log import (
    PLOT_EVERY_S,
    append_metrics,
    follow_metrics,
    plot_run,
    read_metrics,
    run_site_labels,
    truncate_metrics,
)
from fedrad.server.screening import screen_replies
from fedrad.server.site_names import SiteNames
from fedrad.server.strategies import build_strategy


def initial_arrays(cfg: RunConfig) -> tuple[ArrayRecord, dict[str, Any] | None]:
    """The first global model (seeded), its backbone from the run-config's `init` when set (a local timm
    checkpoint or a verified earlier release, fedrad.common.init_weights), and the init's record."""
    import torch

    from fedrad.common.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    record = None
    if cfg.init:
        from fedrad.common.init_weights import apply_init

        init = apply_init(model, cfg.init, cfg.init_pubkey or None, cfg.model, cfg.image_size, cfg.model_norm)
        record = init.to_json()
        log(INFO, "fedrad: initial backbone from %s %s (sha256 %s)", init.kind, init.path, init.sha256[:16])
    return ArrayRecord(model.state_dict()), record


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


@dataclass
class RunState:
    """What every round of one run shares."""

    grid: Grid
    cfg: RunConfig
    run_dir: Path
    strategy: Any  # the screened Flower strategy; also runs evaluation in every mode
    run_key: str
    array_order: list[str]
    names: SiteNames | None = None  # enrolled site names for logs, metrics.jsonl and plots (read from the grid)
    plotted_at: float = -PLOT_EVERY_S  # time.monotonic() of the last redraw of plots/loss.png

    def __post_init__(self) -> None:
        if self.names is None:
            self.names = SiteNames(self.grid)


def _start(cfg: RunConfig, run_dir: Path, strategy) -> tuple[ArrayRecord, int, list, str, dict | None]:
    """(arrays, first round, restored privacy rounds, run key, init record): fresh, or from the last checkpoint
    (the init record then comes from the run.json of the run being resumed)."""
    # Names this run to the sites across resumes (Flower gives a resumed run a new run id): a site keys its
    # sample-DP ledger by it, so a resumed run keeps adding to the same epsilon.
    run_key = uuid.uuid4().hex
    ckpt_path = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, strategy)
        truncate_metrics(run_dir, ckpt.server_round)
        log(INFO, "fedrad: resuming %s after round %d (checkpoint %s)", run_dir, ckpt.server_round, ckpt_path.name)
        return (ckpt.arrays, ckpt.server_round + 1, list(ckpt.info.get("privacy_rounds", [])),
                str(ckpt.info.get("run_key") or run_key), _previous_init(run_dir))
    if cfg.resume:
        log(WARNING, "fedrad: --resume asked but %s has no checkpoint: starting at round 1", run_dir)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    arrays, init = initial_arrays(cfg)
    return arrays, 1, [], run_key, init


def _previous_init(run_dir: Path) -> dict | None:
    """The init record of the run being resumed (its run.json), so a resume does not lose it."""
    import json

    try:
        return json.loads((run_dir / "run.json").read_text()).get("init")
    except (OSError, ValueError, AttributeError):
        return None


def run_federation(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(dict(context.run_config))  # every rule, the privacy ones included
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    strategy = build_strategy(cfg)
    arrays, start_round, restored, run_key, init = _start(cfg, run_dir, strategy)
    if cfg.dp == "client" and not cfg.secagg:
        arrays = _float_buffers(arrays)
    atomic_write_json(run_dir / "run.json", {
        "run_id": context.run_id, "config": dict(context.run_config), "started": time.time(),
        "start_round": start_round, "run_key": run_key, "init": init,
    })
    log(INFO, "fedrad: %s with %s, objective %s, model %s, %d rounds -> %s", type(strategy).__name__,
        cfg.strategy, cfg.objective, cfg.model, cfg.num_server_rounds, run_dir)
    state = RunState(grid, cfg, run_dir, strategy, run_key, list(arrays.keys()))
    mode = round_mode(grid, context, cfg, strategy, run_key, run_dir, restored)
    try:
        rounds_done, stopped, arrays = _round_loop(state, mode, arrays, start_round)
    finally:
        mode.close()
    _finish(state, context, arrays, rounds_done, stopped, getattr(mode, "privacy_ledger", None))


def _finish(state: RunState, context: Context, arrays: ArrayRecord, rounds_done: int, stopped: str, ledger) -> None:
    cfg, run_dir = state.cfg, state.run_dir
    weights = save_global_backbone(arrays, cfg, run_dir, rounds_done)
    plot_run(run_dir)  # every round, whichever the redraw interval skipped
    rows = read_metrics(run_dir)
    sites_seen = len({n for r in rows for n in (r.get("sites") or {})})
    site_eps = {n: m["dp_epsilon"] for r in rows for n, m in (r.get("sites") or {}).items() if "dp_epsilon" in m}
    atomic_write_json(run_dir / "summary.json", {
        "rounds": rounds_done, "rounds_planned": cfg.num_server_rounds, "stopped": stopped,
        "finished": time.time(), "global_weights": weights.name, "config": dict(context.run_config),
        "aggregation": cfg.aggregation,
        "privacy": privacy_summary(cfg, ledger, rounds_done, sites_seen, site_eps),
        "site_names": {n: name for r in rows for n, name in (r.get("site_names") or {}).items()},
    })
    log(INFO, "fedrad: run finished (%s); global backbone %s, metrics %s", stopped, weights,
        run_dir / "metrics.jsonl")


def _round_loop(state: RunState, mode, arrays: ArrayRecord, start_round: int) -> tuple[int, str, ArrayRecord]:
    """The one skeleton of every mode: check -> train (configure, send/receive, screen, aggregate) ->
    evaluate -> record -> checkpoint."""
    cfg = state.cfg
    follow_metrics(state.run_dir)  # each round parses only its new metrics lines, not the whole file again
    for rnd in range(start_round, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        times = RoundTimes()
        try:
            why = mode.stop_before(rnd)
            if why:
                raise RoundStop(why)
            log(INFO, "fedrad: [round %d/%d] sending the global model to the sites", rnd, cfg.num_server_rounds)
            state.names.refresh()
            outcome = mode.train(rnd, arrays, times)
        except RoundStop as stop:
            log(WARNING, "fedrad: %s", stop)
            return rnd - 1, str(stop), arrays
        times.train = time.perf_counter() - t0
        times.site_compute_max = max((r.seconds or 0.0 for r in outcome.reports.values()), default=0.0)
        _log_screening(state, rnd, outcome)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        entry = _round_entry(state, rnd, outcome, mode.privacy_entry(rnd, outcome), arrays, times)
        # Plot (with this round's line) before the checkpoint, the line after it: a crash in between leaves
        # at most a line that resume's truncate_metrics drops, never a checkpoint without its line.
        t_ckpt = time.perf_counter()
        if time.monotonic() - state.plotted_at >= PLOT_EVERY_S:  # _finish draws the last round in any case
            plot_run(state.run_dir, pending=entry)
            state.plotted_at = time.monotonic()
        info = {"array_order": state.array_order, "time": time.time(), "run_key": state.run_key,
                **mode.checkpoint_info()}
        save_checkpoint(state.run_dir, rnd, arrays, state.strategy, info, keep=cfg.keep_checkpoints)
        times.checkpoint = time.perf_counter() - t_ckpt
        entry.update(_time_fields(times, time.perf_counter() - t0))
        append_metrics(state.run_dir, entry)
        log(INFO, "fedrad: [round %d/%d] %d/%d sites aggregated, train loss %s, held-out loss %s (%.1fs, "
            "overhead %.1fs)", rnd, cfg.num_server_rounds, entry["sites_aggregated"], outcome.sent,
            _fmt(entry.get("train_loss")), _fmt(entry.get("eval_loss")), entry["round_seconds"],
            entry["time_overhead"])
        if entry["sites"]:
            log(INFO, "fedrad: [round %d/%d] per site: %s", rnd, cfg.num_server_rounds, _per_site(state, entry))
        if entry.get("probe_examples"):
            log(INFO, "fedrad: [round %d/%d] representation monitor on '%s': k-NN AUC %s, linear-probe AUC %s "
                "(weighted mean over %d labelled images at %d site(s))", rnd, cfg.num_server_rounds, cfg.probe_monitor,
                _fmt(entry.get("knn_auc")), _fmt(entry.get("probe_auc")), entry["probe_examples"],
                entry["monitor_sites"])
    return cfg.num_server_rounds, "completed", arrays


def _log_screening(state: RunState, rnd: int, outcome: TrainOutcome) -> None:
    """One line per site whose update was rejected or whose weight was capped, by its enrolled name."""
    for node, reason in outcome.rejected.items():
        log(WARNING, "fedrad: [round %d] rejected the update of %s: %s", rnd, state.names.label(node), reason)
    for node, reason in outcome.capped.items():
        log(WARNING, "fedrad: [round %d] capped the weight of %s: %s", rnd, state.names.label(node), reason)


def _per_site(state: RunState, entry: dict) -> str:
    """Each site's train loss and image count, by the names the plots use (enrolled name, else "site N")."""
    labels = run_site_labels(state.run_dir)  # the sites seen so far: no pass over every round
    parts = []
    for node, record in entry["sites"].items():
        loss = record.get("train_loss")
        images = record.get("num_examples")
        parts.append(f"{labels.get(node, state.names.label(node))} loss {_fmt(loss)}"
                     + (f" ({int(images)} images)" if images is not None else ""))
    return ", ".join(parts)


def _time_fields(times: RoundTimes, round_seconds: float) -> dict[str, float]:
    """The round's timing fields (module docstring), rounded to the millisecond."""
    fields = {"time_send": times.send, "time_wait": times.wait, "time_site_compute_max": times.site_compute_max,
              "time_aggregate": times.aggregate, "time_train": times.train, "time_checkpoint": times.checkpoint,
              "round_seconds": round_seconds, "time_overhead": round_seconds - times.site_compute_max}
    return {k: round(v, 3) for k, v in fields.items()}


def _evaluate(state: RunState, rnd: int, arrays: ArrayRecord, times: RoundTimes) -> tuple[dict, dict[str, dict]]:
    """Evaluation is the same in every mode: the global model is public to the sites anyway.
    With fraction-evaluate = 0 or eval-in-train the strategy samples no site and nothing is sent or awaited;
    under dp = "sample" neither (sites refuse evaluate messages: their metrics would leave un-noised)."""
    if state.cfg.eval_in_train or state.cfg.dp == "sample":
        return {}, {}
    t0 = time.perf_counter()
    msgs = list(state.strategy.configure_evaluate(rnd, arrays, ConfigRecord({SERVER_ROUND: rnd}), state.grid))
    if not msgs:
        return {}, {}
    times.send += time.perf_counter() - t0
    replies = exchange(state.grid, msgs, state.cfg.round_timeout, times)
    t_agg = time.perf_counter()
    kept, report = screen_replies(replies, None, screening_rules(state.cfg), MESSAGE_EVALUATE)
    metrics = state.strategy.aggregate_evaluate(rnd, kept) if kept else None
    sites = {str(n): r.values(SITE_RECORD) for n, r in report.reports.items() if n in report.accepted}
    times.aggregate += time.perf_counter() - t_agg
    return dict(metrics or {}), sites


def _round_entry(state: RunState, rnd: int, outcome: TrainOutcome, privacy: dict, arrays: ArrayRecord,
                 times: RoundTimes) -> dict:
    """The round's line in metrics.jsonl: counts, what was rejected or capped and why, per-site records."""
    agg_eval, eval_sites = _evaluate(state, rnd, arrays, times)
    sites = {n: r.values(SITE_RECORD) for n, r in outcome.reports.items()}
    for node, why in outcome.capped.items():  # num_examples is the count used; this says why it is not the claim
        sites.setdefault(node, {})["weight_reason"] = why
    for node, values in eval_sites.items():  # a key both replies carry (num_examples) keeps the train value
        record = sites.setdefault(node, {})
        for key, value in values.items():
            record.setdefault(key, value)
    entry: dict[str, Any] = {
        "round": rnd,
        "sites_answered": outcome.answered,
        "sites_aggregated": outcome.aggregated,
        "secagg": bool(state.cfg.secagg),
        "rejected": outcome.rejected,
        "capped": outcome.capped,
        "aggregated": outcome.arrays is not None,
        "lr": state.cfg.round_lr(rnd),  # the round's learning rate (lr-schedule), as sent to the sites
        "sites": sites,
    }
    names = state.names.of(sites)
    if names:
        entry["site_names"] = names  # node id -> enrolled name; `sites` stays keyed by node id
    if outcome.refusal:
        entry["aggregate_refused"] = outcome.refusal
    entry.update(outcome.metrics)
    entry.update(agg_eval)
    entry.update(monitor_means(sites, set(outcome.rejected), state.cfg.probe_monitor_images))
    entry.update(privacy)
    return entry


def monitor_means(sites: dict[str, dict], rejected: set[str], cap: int) -> dict[str, float | int]:
    """The representation monitor's round numbers: each MONITOR metric's mean over the sites that sent it,
    weighted by their `probe_examples` cut to the run's `probe-monitor-images` (no site outweighs that claim);
    a site whose update the round rejected does not count. Adds the total images and the sites counted."""
    keys = metrics_for(MONITOR)
    counted = {n: min(float(r["probe_examples"]), float(cap)) for n, r in sites.items()
               if n not in rejected and r.get("probe_examples", 0) > 0 and any(k in r for k in keys)}
    out: dict[str, float | int] = {}
    for key in keys:
        weights = {n: w for n, w in counted.items() if sites[n].get(key) is not None}
        if weights:
            out[key] = sum(w * float(sites[n][key]) for n, w in weights.items()) / sum(weights.values())
    if out:
        out.update(probe_examples=int(sum(counted.values())), monitor_sites=len(counted))
    return out


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"
