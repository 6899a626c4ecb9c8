"""Pick one of Flower's own strategies by name and put update screening in front of its aggregation."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from fedrad.common.run_config import RunConfig
from fedrad.server.screening import ScreeningReport, screen_replies
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

log = logging.getLogger("fedrad.server")

STRATEGIES = {
    "fedavg": fl.FedAvg,
    "fedavgm": fl.FedAvgM,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
    "multikrum": fl.MultiKrum,
}


class ScreeningMixin:
    """Reject NaN/Inf, wrongly shaped or typed, and norm-outlier updates before the strategy aggregates.

    The round goes on with the remaining replies; what was rejected and why is kept in `last_report`
    for the run log.
    """

    global_arrays: ArrayRecord | None = None
    outlier_factor: float = 10.0
    last_report: ScreeningReport | None = None

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(  # type: ignore[override]
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        assert self.global_arrays is not None, "configure_train runs before aggregate_train"
        kept, report = screen_replies(replies, self.global_arrays, self.outlier_factor)
        self.last_report = report
        for node_id, reason in report.rejected.items():
            log.warning("round %d: rejected the update of node %s: %s", server_round, node_id, reason)
        if len(kept) < getattr(self, "min_train_nodes", 1):
            log.warning("round %d: only %d usable updates (minimum %d): the global model is kept",
                        server_round, len(kept), getattr(self, "min_train_nodes", 1))
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        return _restore_dtypes(arrays, self.global_arrays), metrics


def _restore_dtypes(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """Averaging turns integer buffers (BatchNorm's num_batches_tracked) into floats; cast back to the model's."""
    if arrays is None:
        return None
    out = {}
    for key, ref in reference.items():
        value = arrays[key].numpy()
        target = ref.numpy().dtype
        cast = np.rint(value).astype(target) if target.kind in "iu" else value.astype(target, copy=False)
        out[key] = Array(np.asarray(cast))
    return ArrayRecord(out)


def build_strategy(cfg: RunConfig):
    """Instantiate the run-config's strategy, screened."""
    name = cfg.strategy.lower()
    if name not in STRATEGIES:
        raise ValueError(f"run-config 'strategy': unknown '{cfg.strategy}', choose one of {', '.join(STRATEGIES)}")
    base = STRATEGIES[name]
    kwargs: dict = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=min(cfg.min_train_nodes, cfg.min_available_nodes),
        min_available_nodes=cfg.min_available_nodes,
    )
    if cfg.dp == "client":
        kwargs["weighted_by_key"] = "dp-weight"  # equal site weights: DP noise is calibrated to a plain mean
    if name == "fedavgm":
        kwargs.update(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    elif name == "fedprox":
        kwargs.update(proximal_mu=cfg.proximal_mu)
    elif name in ("fedadam", "fedyogi"):
        kwargs.update(eta=cfg.server_lr if cfg.server_lr != 1.0 else 1e-2, eta_l=cfg.lr)
    elif name == "fedtrimmedavg":
        kwargs.update(beta=cfg.trimmed_beta)
    elif name in ("krum", "multikrum"):
        kwargs.update(num_malicious_nodes=cfg.krum_byzantine)
    cls = type(f"Screened{base.__name__}", (ScreeningMixin, base), {})
    strategy = cls(**kwargs)
    strategy.outlier_factor = cfg.norm_outlier_factor
    return strategy
