"""The site's side of a round: load the site's images, train or evaluate, and build the reply.

Everything here runs inside the hospital. The reply holds the model's arrays and a few aggregate
numbers (loss, examples, steps, seconds); the images, headers and patient keys stay in this process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedrad.common.run_config import RunConfig
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

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
    return load_site(Path(data_dir), cfg.image_size, cache_dir=cache_dir, progress=False, **kwargs)


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

    return list(build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim).state_dict().keys())


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

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim)
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
    result = train_local(model, data, tcfg, progress=False, proximal=proximal)
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
