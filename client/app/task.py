"""The site's side of a round: load the site's images, train or evaluate, and build the reply.

Everything here runs inside the hospital. The reply holds the model's arrays and a few aggregate
numbers (loss, examples, steps, seconds); the images, headers and patient keys stay in this process.

In a warm worker (fedrad.client.runtime.site_runtime) this module stays imported between the messages of one run, and
`_RESIDENT` keeps the decoded site data and the model object there, each keyed by everything that determines
it (run id included, so nothing outlives its run's worker anyway). Optimizer state is not kept: every
objective here starts each round from a fresh optimizer on the received weights (client/training/trainer.py), and
BYOL's target network is rebuilt from them by design (common/losses/byol.py).

Between rounds (node-config `idle-release`, default on) `release_idle` lets go of what the worker does not use
while it waits: the model (rebuilt from the next message's weights, which overwrite all of it anyway), the
memory maps of the site's decoded images (a StoreView's maps: mapped again on the next read) or, for a site whose
images are held in memory, the site data itself (read again from the decoded cache). Most of an idle worker's
memory is its imports (torch, Flower, fedrad), which stay: benchmarks/notes/many_sites.md has the measured split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedrad.client.app.probe_monitor import site_monitor
from fedrad.common.node_config import NodeConfig
from fedrad.common.packing import Layout, pack, unpack
from fedrad.common.protocol import ARRAYS, CONFIG, METRICS, ROUND_LR, RUN_KEY, SERVER_ROUND, ProtocolError, SiteReport
from fedrad.common.run_config import RunConfig

log = logging.getLogger("fedrad.client")

# slot -> (key, object): at most one site data and one model; a new key drops the old object before building.
_RESIDENT: dict[str, tuple[tuple, object]] = {}


def _resident(slot: str, key: tuple, build):
    """The object in `slot` when it was built for `key`, else a fresh one from `build()` (kept for next time)."""
    held = _RESIDENT.get(slot)
    if held is not None and held[0] == key:
        return held[1]
    _RESIDENT.pop(slot, None)
    value = build()
    _RESIDENT[slot] = (key, value)
    return value


def release_idle() -> dict[str, int]:
    """Let go of the resident model and the site images' memory (see the module docstring); collect the freed
    objects and hand freed heap back to the OS. What was released, by kind (for the node's debug log)."""
    import gc
    import sys

    import numpy as np

    from fedrad.common.store_view import StoreView

    out = {"model": 0, "maps": 0, "site": 0}
    if _RESIDENT.pop("model", None) is not None:
        out["model"] = 1
    held = _RESIDENT.get("site")
    if held is not None:
        images = getattr(held[1], "images", None)
        if isinstance(images, StoreView):
            out["maps"] = images.release()  # the index (paths, keys, labels) stays: no rescan next round
        elif not isinstance(images, np.memmap):  # images held in memory: read again from the decoded cache
            # (a single-chunk np.memmap stays: its pages are file-backed, and the kernel reclaims them under
            # pressure without the worker's help)
            _RESIDENT.pop("site", None)
            out["site"] = 1
    held = images = None
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return out


def release_after(context: Context) -> None:
    """`release_idle` when the site's node-config `idle-release` is on (the default)."""
    if _node(context).idle_release:
        log.debug("idle release: %s", release_idle())


def _node(context: Context) -> NodeConfig:
    """The site's node config, typed (fedrad.common.node_config): a bad value names its key."""
    return NodeConfig.of(context.node_config)


def load_site_for(context: Context, cfg: RunConfig):
    """The SiteData of this node, decoded once into the site-local cache and reused across rounds."""
    from fedrad.client.site.policy import policy_for
    from fedrad.client.site.site_data import load_site
    from fedrad.client.site.site_state import state_paths

    node = _node(context)
    data_dir = node.data_dir
    if not data_dir:
        raise ValueError("node-config 'data-dir' is not set: start the node with `fedrad node --data DIR`")
    cache_dir = node.cache_dir or None
    labels = node.labels or None
    kwargs: dict = {"labels_csv": labels} if labels else {}
    kwargs["state_dir"] = state_paths(context.node_config).root  # the salt lives in the state folder, not the cache
    policy = policy_for(dict(context.node_config))
    kwargs["max_pixels"] = policy.max_pixels  # the site's pixel budget
    kwargs["rules"] = policy.data_rules  # modalities, burned-in, series sampling
    from fedrad.common.cache import INLINE_DECODE_MAX

    # a round decodes new files itself only when they are few; more wait for `fedrad ingest` (issue 26)
    kwargs["max_decode"] = INLINE_DECODE_MAX if node.inline_decode_max is None else node.inline_decode_max
    from fedrad.common.sources.pacs import PacsOptions, is_source_url

    if is_source_url(data_dir):  # a PACS: data-dir is its URL, node config source-* its query and limits
        kwargs["source_options"] = PacsOptions.from_config(context.node_config)
    key = (context.run_id, data_dir, cfg.image_size, cache_dir, repr(sorted(kwargs.items())))
    return _resident("site", key, lambda: load_site(data_dir if is_source_url(data_dir) else Path(data_dir),
                                                    cfg.image_size, cache_dir=cache_dir, progress=False, **kwargs))


def _sample_dp_for(msg: Message, context: Context, cfg: RunConfig, n_train: int, server_round: int):
    """(SampleDP for this message's steps, SiteBudget, Planned entry or None, Refusal or None).

    The budget is the stricter of the site policy's `epsilon_budget` and the run's `dp-epsilon-budget`,
    applied to the site's ε over EVERY entry of its ledger (client/site/budget.py): a fresh run key from the
    coordinator adds entries, it never resets ε. When the round fits, its steps are appended as a planned entry
    before training starts (a crash over-counts, never under-counts; concurrent runs cannot both spend the
    last of the budget); the entry is keyed by the Flower run id and message id the site saw and by the
    signed statement, never by the coordinator's run-key (kept as a label).
    """
    from fedrad.client.site.budget import OverBudget, SiteBudget
    from fedrad.client.site.policy import Refusal, epsilon_limit, policy_for
    from fedrad.client.site.site_state import open_state, state_paths
    from fedrad.client.training.sample_dp import SampleDP, sample_rate
    from fedrad.common.run_signature import statement_key

    config = msg.content[CONFIG] if CONFIG in msg.content else {}
    state = state_paths(context.node_config)
    budget = SiteBudget(state, cfg.dp_delta, epsilon_limit(policy_for(dict(context.node_config)), cfg))
    dp = SampleDP(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta)
    steps = [(cfg.dp_noise, sample_rate(cfg.batch_size, n_train), int(cfg.local_steps))]
    planned = budget.plan(steps, flower_run_id=context.run_id, message_id=str(msg.metadata.message_id or ""),
                          statement=statement_key(dict(context.run_config)),
                          run_key=str(config.get(RUN_KEY, "") or ""), server_round=server_round)
    if isinstance(planned, OverBudget):
        return dp, budget, None, Refusal(
            "epsilon_budget", f"this round's {cfg.local_steps} steps would take this site's image-level epsilon "
            f"over all runs to {planned.epsilon:.4f} > budget {planned.limit:g} (delta {cfg.dp_delta:g}; the "
            "stricter of the site policy's and the run's); not training")
    open_state(state)  # marks the ledger as held: losing it later refuses training instead of restarting at 0
    return dp, budget, planned, None


def round_lr_for(msg: Message, cfg: RunConfig, server_round: int) -> float:
    """This round's learning rate: the signed run config's schedule (fedrad.common.lr_schedule). The coordinator
    sends it in plain mode; a sent value that is not the schedule's is refused (ProtocolError), since only the
    signed config says what a site agreed to train with. SecAgg+'s messages carry none: computed here."""
    expected = cfg.round_lr(server_round)
    config = msg.content[CONFIG] if CONFIG in msg.content else {}
    if ROUND_LR not in config:
        return expected
    sent = config[ROUND_LR]
    if isinstance(sent, bool) or not isinstance(sent, int | float) or abs(float(sent) - expected) > 1e-9 * max(
            abs(expected), 1e-12):
        raise ProtocolError(f"message config '{ROUND_LR}' = {sent!r} is not the signed schedule's {expected:g}")
    return float(sent)


def train_config_for(cfg: RunConfig, device: str, server_round: int, node_seed: int, lr: float | None = None):
    from fedrad.client.training.trainer import TrainConfig

    return TrainConfig.from_recipe(cfg, cfg.local_steps, device, lr,
                                   seed=cfg.seed * 1_000_003 + server_round * 7919 + node_seed)


def wire_layout(state: dict, cfg: RunConfig) -> Layout:
    """The one model layout this site accepts and sends (fedrad.common.packing): `state` (the model's state
    dict) in order, integer buffers as float32 in plain dp=client runs (the coordinator sends them so)."""
    layout = Layout.of(state)
    return layout.ints_as_float32() if cfg.dp == "client" and not cfg.secagg else layout


def model_layout(cfg: RunConfig) -> Layout:
    """`wire_layout` of the model the run config builds (SecAgg+'s legacy messages carry unnamed arrays)."""
    from fedrad.common.models import build_model

    model = build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)
    return wire_layout(model.state_dict(), cfg)


def _reply_arrays(model, received: dict, layout: Layout, cfg: RunConfig) -> ArrayRecord:
    """The trained weights packed in the layout the coordinator sent. Under DP the integer buffers
    (BatchNorm batch counters) are returned as received, so the clipped update holds only the trained floats."""
    state = model.state_dict()
    out = {}
    for key in layout.keys:
        value = state[key].detach().cpu().numpy()
        if cfg.dp != "none" and (value.dtype.kind in "iu" or received[key].dtype.kind in "iu"):
            value = received[key]
        out[key] = value
    return pack(out, layout)


def _model_from(msg: Message, cfg: RunConfig, run_id: int):
    """(model, received arrays, layout): the model holding the message's weights, the resident one of this
    architecture when there is one (a strict load overwrites every parameter and buffer). Under dp=sample a
    fresh one every message: opacus rewires the module it trains, and that must never carry over into the
    next message. The message's packed arrays must be exactly this model's layout (PackingError otherwise)."""
    import torch

    from fedrad.common.models import build_model

    def build():
        return build_model(cfg.model, cfg.objective, cfg.image_size, proj_dim=cfg.proj_dim, norm=cfg.model_norm)

    if cfg.dp == "sample":
        model = build()
    else:
        model = _resident("model", (run_id, cfg.model, cfg.objective, cfg.image_size, cfg.proj_dim, cfg.model_norm),
                          build)
        model.zero_grad(set_to_none=True)
    layout = wire_layout(model.state_dict(), cfg)
    received = unpack(msg.content[ARRAYS], layout)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in received.items()}, strict=True)
    return model, received, layout


def handle_train(msg: Message, context: Context) -> Message:
    """Train on the received global weights. With run-config `eval-in-train` the reply also carries the
    held-out metrics of the RECEIVED global weights, measured before training (what an evaluate message would
    have measured one round earlier), so the coordinator needs no evaluate message."""
    import torch

    from fedrad.client.training.trainer import train_local

    cfg = RunConfig.of(context.run_config)  # parsed once per message (the policy mod already did)
    server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0)) if CONFIG in msg.content else 0
    device = _node(context).device  # the trainer resolves "auto"
    if _node(context).threads > 0:  # unset: torch's own default (all cores)
        torch.set_num_threads(_node(context).threads)
    t0 = time.perf_counter()
    data = load_site_for(context, cfg)
    model, received, layout = _model_from(msg, cfg, context.run_id)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    proximal = (cfg.fedprox_mu, start_state) if cfg.fedprox_mu > 0 else None
    tcfg = train_config_for(cfg, device, server_round, context.node_id % 100_000, round_lr_for(msg, cfg, server_round))
    procs = _node(context).ddp_procs
    dp = None
    if cfg.dp == "sample":  # over several processes too: one Poisson draw, one noise, one accountant, one entry
        from fedrad.client.app.error_reply import refuse
        from fedrad.client.site.site_state import state_paths
        from fedrad.client.training.trainer import split_indices
        from fedrad.common.protocol import ErrorCode

        n_train = len(split_indices(data, tcfg.holdout)[0])
        try:
            dp, budget, planned, refusal = _sample_dp_for(msg, context, cfg, n_train, server_round)
        except ValueError as exc:  # an unreadable ledger or state: refuse, never restart ε at 0
            return refuse(msg, ErrorCode.PRIVACY_BUDGET, "dp_ledger", str(exc), audit=state_paths(context.node_config))
        if refusal is not None:
            return refuse(msg, ErrorCode.PRIVACY_BUDGET, refusal.rule, refusal.detail, audit=budget.state)
    scores = _held_out_scores(model, data, cfg, device) if cfg.eval_in_train else {}
    if cfg.eval_in_train:  # the representation monitor of the received weights, also before training
        scores.update(site_monitor(model, data, cfg, context.node_config, device, server_round))
    if procs > 1:  # several devices: rank 0's weights come back into `model`; still one reply (one SecAgg+ share)
        from fedrad.client.training.ddp import train_distributed

        result = train_distributed(model, data, tcfg, procs, proximal=proximal, dp=dp)
    else:
        result = train_local(model, data, tcfg, progress=False, proximal=proximal, dp=dp)
    model.to("cpu")
    seconds = time.perf_counter() - t0
    report = SiteReport(
        train_loss=sum(result.losses[-3:]) / len(result.losses[-3:]),
        train_loss_first=result.losses[0],
        num_examples=len(data),
        images_pending=data.pending or None,  # only when a site has files waiting for `fedrad ingest`
        examples_seen=result.examples,
        steps=result.steps,
        seconds=seconds,
        train_seconds=result.seconds,
        **scores,
    )
    if dp is not None:
        from dataclasses import replace

        from fedrad.client.training.sample_dp import sample_rate

        # Recorded before the weights leave: a crash after this over-counts, never under-counts.
        eps = budget.record(planned.entry_id, result.dp_history)
        next_steps = [(cfg.dp_noise, sample_rate(cfg.batch_size, n_train), int(cfg.local_steps))]
        report = replace(report, dp_epsilon=eps, dp_epsilon_next=budget.check(next_steps))
    # The site's one line per message (the node's terminal and log): what it did with its own images.
    privacy = f", image-level ε {report.dp_epsilon:.3f} at δ {cfg.dp_delta:g}" if report.dp_epsilon is not None else ""
    log.info("round %s train (%s): %d steps on %d images, loss %.4f -> %.4f, %.1f images/s, %.1f s%s",
             server_round, cfg.objective, result.steps, len(data), result.losses[0], result.losses[-1],
             result.examples / max(result.seconds, 1e-9), seconds, privacy)
    content = RecordDict({ARRAYS: _reply_arrays(model, received, layout, cfg),
                          METRICS: MetricRecord(report.to_metrics())})
    return Message(content=content, reply_to=msg)


def _held_out_scores(model, data, cfg: RunConfig, device: str) -> dict[str, float]:
    """evaluate_local's held-out metrics (SiteReport fields), as an evaluate message computes them."""
    from fedrad.client.training.trainer import evaluate_local

    return evaluate_local(model, data, train_config_for(cfg, device, 0, 0))


def handle_evaluate(msg: Message, context: Context) -> Message:
    from fedrad.client.training.trainer import evaluate_local

    cfg = RunConfig.of(context.run_config)
    device = _node(context).device
    data = load_site_for(context, cfg)
    model, _, _ = _model_from(msg, cfg, context.run_id)
    tcfg = train_config_for(cfg, device, 0, 0)
    t0 = time.perf_counter()
    scores = evaluate_local(model, data, tcfg)
    server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0)) if CONFIG in msg.content else 0
    log.info("round %s evaluate (%s): held-out loss %.4f on %d images, %.1f s", server_round, cfg.objective,
             scores["eval_loss"], int(scores["eval_examples"]), time.perf_counter() - t0)
    scores.update(site_monitor(model, data, cfg, context.node_config, device, server_round))
    report = SiteReport(num_examples=len(data), **scores)  # evaluate_local's keys are SiteReport fields
    return Message(content=RecordDict({METRICS: MetricRecord(report.to_metrics())}), reply_to=msg)
