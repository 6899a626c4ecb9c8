"""The site's side of a round: load the site's images, train or evaluate, and build the reply.

Everything here runs inside the hospital. The reply holds the model's arrays and a few aggregate
numbers (loss, examples, steps, seconds); the images, headers and patient keys stay in this process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedrad.common.run_config import RunConfig
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

log = logging.getLogger("fedrad.client")


def _node_setting(context: Context, key: str, default: str = "") -> str:
    return str(context.node_config.get(key, default) or default)


def load_site_for(context: Context, cfg: RunConfig):
    """The SiteData of this node, decoded once into the site-local cache and reused across rounds."""
    from fedrad.client.site_data import load_site

    data_dir = _node_setting(context, "data-dir")
    if not data_dir:
        raise ValueError("node-config 'data-dir' is not set: start the node with `fedrad node --data DIR`")
    cache_dir = _node_setting(context, "cache-dir") or None
    labels = _node_setting(context, "labels") or None
    kwargs = {"labels_csv": labels} if labels else {}
    from fedrad.common.sources.pacs import PacsOptions, is_source_url

    if is_source_url(data_dir):  # a PACS: data-dir is its URL, node config source-* its query and limits
        kwargs["source_options"] = PacsOptions.from_config(context.node_config)
    return load_site(data_dir if is_source_url(data_dir) else Path(data_dir), cfg.image_size, cache_dir=cache_dir,
                     progress=False, **kwargs)


def dp_ledger_path(context: Context) -> Path:
    """The site's sample-DP ledger: beside the decoded-image cache, outliving ClientApp processes and runs."""
    from fedrad.client.sample_dp import LEDGER_FILE
    from fedrad.client.site_data import default_cache_dir

    cache_dir = _node_setting(context, "cache-dir")
    return Path(cache_dir or default_cache_dir(Path(_node_setting(context, "data-dir")))) / LEDGER_FILE


def _sample_dp_for(msg: Message, context: Context, cfg: RunConfig, n_train: int):
    """(SampleDP with this run's history so far, run key, ledger path, ε after this round's steps); the
    caller refuses the round when that ε would pass `dp-epsilon-budget` (the site enforces it itself)."""
    from fedrad.client.sample_dp import SampleDP, ledger_history, projected_epsilon

    config = msg.content["config"] if "config" in msg.content else {}
    run_key = str(config.get("run-key", "") or f"flwr-run-{context.run_id}")
    path = dp_ledger_path(context)
    dp = SampleDP(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, ledger_history(path, run_key))
    eps_after = projected_epsilon(dp, n_train, cfg.batch_size, cfg.local_steps)
    return dp, run_key, path, eps_after


def train_config_for(cfg: RunConfig, device: str, server_round: int, node_seed: int):
    from fedrad.client.trainer import TrainConfig

    return TrainConfig(
        objective=cfg.objective,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        label_fields=cfg.label_field_list,
        device=device,
        seed=cfg.seed * 1_000_003 + server_round * 7919 + node_seed,
        hflip=cfg.hflip,
        image_size=cfg.image_size,
    )


def model_keys(cfg: RunConfig) -> list[str]:
    """The model's state-dict names in order (SecAgg+'s legacy messages carry arrays without names)."""
    from fedrad.common.models import build_model

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    return list(model.state_dict().keys())


def _reply_arrays(model, received: ArrayRecord, cfg: RunConfig) -> ArrayRecord:
    """The trained weights in the dtypes the coordinator sent. Under DP the integer buffers (BatchNorm batch
    counters) are returned as received, so the clipped update holds only the trained floats."""
    import numpy as np
    from flwr.app import Array

    state = model.state_dict()
    out = {}
    for key, ref in received.items():
        ref_np = ref.numpy()
        value = state[key].detach().cpu().numpy()
        if cfg.dp != "none" and (value.dtype.kind in "iu" or ref_np.dtype.kind in "iu"):
            value = ref_np
        out[key] = Array(np.array(value, dtype=ref_np.dtype, order="C"))  # keeps 0-d arrays 0-d
    return ArrayRecord(out)


def _model_from(msg: Message, cfg: RunConfig):
    from fedrad.common.models import build_model

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return model


def handle_train(msg: Message, context: Context) -> Message:
    import torch
    from fedrad.client.trainer import train_local

    cfg = RunConfig.from_flower(dict(context.run_config))
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    device = _node_setting(context, "device", "auto")  # the trainer resolves "auto"
    threads = int(_node_setting(context, "threads", "0") or 0)
    if threads > 0:  # unset: torch's own default (all cores)
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = load_site_for(context, cfg)
    model = _model_from(msg, cfg)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.proximal_mu > 0 and cfg.strategy == "fedprox":
        proximal = (cfg.proximal_mu, start_state)
    else:
        proximal = None
    tcfg = train_config_for(cfg, device, server_round, context.node_id % 100_000)
    dp = None
    if cfg.dp == "sample":
        from fedrad.client.trainer import split_indices

        n_train = len(split_indices(data, tcfg.holdout)[0])
        dp, run_key, ledger, eps_after = _sample_dp_for(msg, context, cfg, n_train)
        if cfg.dp_epsilon_budget > 0 and eps_after > cfg.dp_epsilon_budget:
            why = (f"fedrad privacy: dp epsilon budget: this round's {cfg.local_steps} steps would take this "
                   f"site's image-level epsilon to {eps_after:.4f} > dp-epsilon-budget {cfg.dp_epsilon_budget:g} "
                   f"(delta {cfg.dp_delta:g}); not training")
            log.warning(why)
            return Message(Error(code=429, reason=why), reply_to=msg)
    result = train_local(model, data, tcfg, progress=False, proximal=proximal, dp=dp)
    model.to("cpu")
    seconds = time.perf_counter() - t0
    log.info("round %s: %d local steps on %d images, loss %.4f -> %.4f in %.1fs", server_round,
             result.steps, len(data), result.losses[0], result.losses[-1], seconds)
    metrics = MetricRecord({
        "train_loss": float(sum(result.losses[-3:]) / len(result.losses[-3:])),
        "train_loss_first": float(result.losses[0]),
        "num-examples": int(len(data)),
        "examples_seen": int(result.examples),
        "steps": int(result.steps),
        "seconds": float(seconds),
        "train_seconds": float(result.seconds),
    })
    if cfg.dp == "client":
        metrics["dp-weight"] = 1.0  # equal weights: the DP noise is calibrated to an unweighted mean
    if dp is not None:
        from fedrad.client.sample_dp import ledger_record, projected_epsilon

        # Recorded before the weights leave: a crash after this over-counts, never under-counts.
        eps = ledger_record(ledger, run_key, result.dp_history, cfg.dp_delta, server_round)
        dp.history = result.dp_history
        metrics["dp_epsilon"] = float(eps)
        metrics["dp_epsilon_next"] = float(projected_epsilon(dp, n_train, cfg.batch_size, cfg.local_steps))
        log.info("round %s: DP-SGD at this site, image-level epsilon %.4f at delta %g (ledger %s)", server_round,
                 eps, cfg.dp_delta, ledger)
    content = RecordDict({"arrays": _reply_arrays(model, msg.content["arrays"], cfg), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    from fedrad.client.trainer import evaluate_local

    cfg = RunConfig.from_flower(dict(context.run_config))
    device = _node_setting(context, "device", "auto")
    data = load_site_for(context, cfg)
    model = _model_from(msg, cfg)
    tcfg = train_config_for(cfg, device, 0, 0)
    scores = evaluate_local(model, data, tcfg)
    metrics = {k: float(v) for k, v in scores.items()}
    metrics["num-examples"] = int(len(data))
    if cfg.dp == "client":
        metrics["dp-weight"] = 1.0  # the strategy averages with equal weights under DP (train and evaluate)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
