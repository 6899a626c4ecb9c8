"""Pick one of Flower's own strategies by name; weight by the coordinator's validated weights, accept only a
finite aggregate."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedrad.common.protocol import AGGREGATION_WEIGHT, ARRAYS, METRICS
from fedrad.common.run_config import RunConfig
from fedrad.server.screening import ScreenedUpdate, UpdateSpill

log = logging.getLogger("fedrad.server")

@dataclass(frozen=True)
class StrategySpec:
    """One row per run-config strategy name: everything the coordinator needs to know about it.

    `flower`: Flower's class; `knobs`: its constructor arguments from the run config; `mean`: its aggregate is
    the weighted mean of the updates, then at most a server step (such strategies fold a round's replies one at
    a time, GuardedAggregation.aggregate_screened); `server_step`: it steps the mean with a server optimiser
    (BatchNorm's running statistics are then averaged aside, never stepped). Which names can run on SecAgg+'s
    masked sum is declared with the name in common/run_config.py STRATEGY_NAMES (the site and `fedrad run` read
    it without importing Flower's strategies); tests/test_server_units.py checks the two tables agree.
    """

    flower: type
    knobs: Callable[[RunConfig], dict[str, Any]] = lambda cfg: {}
    mean: bool = False
    server_step: bool = False


def _server_optimiser(cfg: RunConfig) -> dict[str, Any]:
    return {"eta": cfg.server_lr if cfg.server_lr != 1.0 else 1e-2, "eta_l": cfg.lr}


STRATEGY_SPECS: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(fl.FedAvg, mean=True),
    "fedavgm": StrategySpec(fl.FedAvgM, lambda cfg: {"server_learning_rate": cfg.server_lr,
                                                     "server_momentum": cfg.server_momentum},
                            mean=True, server_step=True),
    "fedprox": StrategySpec(fl.FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}, mean=True),
    "fedadam": StrategySpec(fl.FedAdam, _server_optimiser, mean=True, server_step=True),
    "fedyogi": StrategySpec(fl.FedYogi, _server_optimiser, mean=True, server_step=True),
    "fedmedian": StrategySpec(fl.FedMedian),
    "fedtrimmedavg": StrategySpec(fl.FedTrimmedAvg, lambda cfg: {"beta": cfg.trimmed_beta}),
    "krum": StrategySpec(fl.Krum, lambda cfg: {"num_malicious_nodes": cfg.krum_byzantine}),
    "multikrum": StrategySpec(fl.MultiKrum, lambda cfg: {"num_malicious_nodes": cfg.krum_byzantine}),
}
# Views of the table, by the names the rest of the coordinator uses.
STRATEGIES = {name: spec.flower for name, spec in STRATEGY_SPECS.items()}
MEAN_STRATEGIES = tuple(name for name, spec in STRATEGY_SPECS.items() if spec.mean)
# BatchNorm's running statistics are averaged as they are, never stepped by a server optimizer: FedAvgM's
# momentum or FedAdam's step extrapolates them like weights, and a variance driven below zero makes the global
# model NaN (seen with FedAvgM at server-lr 2 on PneumoniaMNIST).
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in RUNNING_STATS


class GuardedAggregation:
    """What fedrad adds to every Flower strategy: it weights by the coordinator's AGGREGATION_WEIGHT (set by
    screening, never by a site), casts integer buffers back, and accepts an aggregate only when finite.

    Replies reach it already screened (fedrad.server.screening.screen_replies, called by the round loop):
    well-formed, validated counts, capped weights, no norm outliers.
    """

    global_arrays: ArrayRecord | None = None
    last_refusal: str | None = None  # why the last aggregate was not accepted (the round keeps the weights)

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(  # type: ignore[override]
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        assert self.global_arrays is not None, "configure_train runs before aggregate_train"
        self.last_refusal = None
        if len(replies) < getattr(self, "min_train_nodes", 1):
            self.last_refusal = (f"only {len(replies)} usable updates (minimum {getattr(self, 'min_train_nodes', 1)})"
                                 ": the global model is kept")
            log.warning("round %d: %s", server_round, self.last_refusal)
            return None, None
        stats = None
        if self._spec().server_step and any(is_running_stat(k) for k in self.global_arrays.keys()):
            stats = _running_stats_mean(replies, self.weighted_by_key)  # type: ignore[attr-defined]
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        arrays = _with_running_stats(_restore_dtypes(arrays, self.global_arrays), stats, self.global_arrays)
        return self._accept(server_round, arrays, metrics)

    def _spec(self) -> StrategySpec:
        """This strategy's row of STRATEGY_SPECS (build_strategy sets it; else found by its Flower class)."""
        spec = getattr(self, "spec", None)
        return spec if spec is not None else _spec_of(self._flower_base())

    def _flower_base(self) -> type:
        """The Flower strategy this one guards."""
        return next(c for c in type(self).__mro__ if c.__module__.startswith("flwr."))

    def _accept(self, server_round: int, arrays: ArrayRecord | None, metrics: MetricRecord | None
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        bad = non_finite_array(arrays)
        if bad is not None:
            self.last_refusal = f"the aggregate of '{bad}' is not finite: the global model is kept"
            log.warning("round %d: %s", server_round, self.last_refusal)
            return None, None
        return arrays, metrics

    def aggregate_screened(self, server_round: int, updates: list[ScreenedUpdate], spill: UpdateSpill
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`aggregate_train` for a MEAN_STRATEGIES strategy on updates that `screen_stream` left in `spill`.

        The weighted mean is folded one array at a time, reading each site's array back from disk, with the
        same factors and the same order of operations as Flower's `aggregate_arrayrecords` (so the result
        is the same to the bit); the metrics go through the strategy's own metric aggregation. FedAvg and
        FedProx take that mean as it is; FedAvgM / FedAdam / FedYogi get it as one reply of weight 1, which
        Flower's FedAvg step passes through unchanged (x * 1.0), so their server step runs as before.
        """
        assert self.global_arrays is not None, "configure_train runs before aggregate_train"
        self.last_refusal = None
        minimum = getattr(self, "min_train_nodes", 1)
        if len(updates) < minimum:
            self.last_refusal = f"only {len(updates)} usable updates (minimum {minimum}): the global model is kept"
            log.warning("round %d: %s", server_round, self.last_refusal)
            return None, None
        records = [RecordDict({METRICS: MetricRecord(u.metrics)}) for u in updates]
        metrics = self.train_metrics_aggr_fn(records, self.weighted_by_key)  # type: ignore[attr-defined]
        total = sum(u.weight for u in updates)
        factors = [u.weight / total for u in updates]
        spec = self._spec()
        plain = spec.mean and not spec.server_step  # its aggregate IS the mean (FedProx differs at the sites only)
        mean: dict[str, Array] = {}
        for key, ref in self.global_arrays.items():
            acc = spill.read(updates[0].path, key) * factors[0]
            for update, factor in zip(updates[1:], factors[1:], strict=True):
                acc += spill.read(update.path, key) * factor
            mean[key] = Array(np.asarray(_restored(acc, ref.dtype) if plain else acc))
            del acc
        arrays = ArrayRecord(mean)
        del mean
        if plain:
            return self._accept(server_round, arrays, metrics)
        stats = ArrayRecord({k: a for k, a in arrays.items() if is_running_stat(k)})
        reply = Message(content=RecordDict({ARRAYS: arrays, METRICS: MetricRecord(
            {**dict(metrics or {}), AGGREGATION_WEIGHT: 1.0})}), metadata=updates[0].metadata)
        del arrays
        arrays, metrics = super().aggregate_train(server_round, [reply])  # type: ignore[misc]
        arrays = _with_running_stats(_restore_dtypes(arrays, self.global_arrays), stats, self.global_arrays)
        return self._accept(server_round, arrays, metrics)


def non_finite_array(arrays: ArrayRecord | None) -> str | None:
    """The name of the first float array holding NaN or Inf, or None."""
    for key, arr in (arrays or {}).items():
        value = arr.numpy()
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return key
    return None


def _restored(value: np.ndarray, dtype: str) -> np.ndarray:
    """Averaging turns integer buffers (BatchNorm's num_batches_tracked) into floats; cast back to the model's."""
    target = np.dtype(dtype)
    return np.rint(value).astype(target) if target.kind in "iu" else value.astype(target, copy=False)


def _running_stats_mean(replies: list[Message], weighted_by_key: str) -> ArrayRecord:
    """The weighted mean of the replies' BatchNorm running statistics only (Flower's own weighted mean, on
    records that hold just those arrays: the weights are not averaged a second time)."""
    records = [RecordDict({ARRAYS: ArrayRecord({k: a for rec in reply.content.array_records.values()
                                                for k, a in rec.items() if is_running_stat(k)}),
                           METRICS: next(iter(reply.content.metric_records.values()))}) for reply in replies]
    return aggregate_arrayrecords(records, weighted_by_key)


def _with_running_stats(arrays: ArrayRecord | None, mean: ArrayRecord | None, reference: ArrayRecord
                        ) -> ArrayRecord | None:
    """`arrays` (a server step's result) with each BatchNorm running statistic taken from the plain weighted
    `mean` of the replies, in the global model's dtype."""
    if arrays is None or mean is None:
        return arrays
    return ArrayRecord({k: Array(np.asarray(_restored(mean[k].numpy(), reference[k].dtype)))
                        if is_running_stat(k) and k in mean else a for k, a in arrays.items()})


def _restore_dtypes(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    if arrays is None:
        return None
    return ArrayRecord({key: Array(np.asarray(_restored(arrays[key].numpy(), ref.dtype)))
                        for key, ref in reference.items()})


def _spec_of(flower_class: type) -> StrategySpec:
    return next(spec for spec in STRATEGY_SPECS.values() if spec.flower is flower_class)


def build_strategy(cfg: RunConfig):
    """Instantiate the run-config's strategy with fedrad's guarded aggregation."""
    name = cfg.strategy.lower()
    base = STRATEGY_SPECS[name].flower
    kwargs: dict = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=min(cfg.min_train_nodes, cfg.min_available_nodes),
        min_available_nodes=cfg.min_available_nodes,
        weighted_by_key=AGGREGATION_WEIGHT,  # written by screening (equal weights under dp=client)
    )
    kwargs.update(STRATEGY_SPECS[name].knobs(cfg))
    cls = type(f"Guarded{base.__name__}", (GuardedAggregation, base), {"spec": STRATEGY_SPECS[name]})
    return cls(**kwargs)
