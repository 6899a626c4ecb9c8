"""SecAgg+ training rounds on the coordinator (run-config `secagg = true`).

flwr 1.41 offers SecAgg+ only on its legacy path: `flwr.server.workflow.SecAggPlusWorkflow` driven by a
`LegacyContext` and a legacy `Strategy`, with `flwr.client.mod.secaggplus_mod` at the sites. fedrad runs that
workflow one round at a time from its own round loop (so checkpoints, metrics.jsonl and plots are written
after every round exactly as in plain mode) and adapts formats at the edges:

- the sites send their *update* (local weights minus the global weights) rather than the weights, so the
  fixed-point range of SecAgg+ (`clipping_range`) is spent on small numbers; the coordinator adds the
  securely summed mean update to the global weights;
- the model travels in fedrad's wire format (fedrad.common.packing): the FitIns, each site's masked vector
  and the unmasked sum hold one flat array per dtype, not one per state-dict entry;
- integer buffers (BatchNorm's batch counters) are not masked: every site advances them by the same number
  of local steps, so the coordinator advances them by `local-steps` itself;
- each site's weight is its number of images capped at MAX_WEIGHT (equal weights under dp=client).

Only the sum is ever unmasked. A round in which SecAgg+ cannot finish (too many sites dropped for the
reconstruction threshold, or sites that do not speak SecAgg+) raises instead of silently training nothing.

Limits, stated: each site weights its own masked update, so the coordinator can neither cap one site's
count relative to the others (as plain mode does) nor screen update norms; a site's weight is bounded by
MAX_WEIGHT only when it follows the protocol. The coordinator checks what it can: every claimed count
(sent in the clear beside the masked vector) must be a positive whole number <= MAX_WEIGHT, the metrics
must be SiteReport fields, and the unmasked mean must be finite; otherwise the round keeps the previous
weights and says why. That is why secagg=true runs only strategies that are a weighted mean
(common/run_config.STRATEGY_NAMES).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrad.common.packing import Layout, PackingError, pack, split
from fedrad.common.protocol import AGGREGATE, MESSAGE_TRAIN, SECAGG_MAX_WEIGHT, SERVER_ROUND, ProtocolError, SiteReport
from fedrad.common.run_config import RunConfig
from fedrad.server.exchange import PromptGrid

MAX_WEIGHT = 1_000.0  # a site's weight in the mean is min(num_examples, MAX_WEIGHT)
CLIPPING_RANGE = 1.0  # per-element range of a weighted update (weight <= 1) before quantisation
MAX_SITES = 31  # quantisation range below leaves room for this many summands modulo 2**32
QUANTIZATION_RANGE = 2**27
MODULUS_RANGE = 2**32


class SecAggRoundFailed(RuntimeError):
    pass


@dataclass
class SecAggResult:
    arrays: ArrayRecord | None  # None: the aggregate was refused (`refusal` says why); keep the weights
    metrics: dict[str, float]
    reports: dict[str, SiteReport]
    sampled: int
    aggregated: int
    failures: list[str] = field(default_factory=list)
    refusal: str | None = None


def _legacy_collector(cfg: RunConfig):
    """A legacy Strategy that samples sites like FedAvg and keeps what SecAgg+ unmasked."""
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class Collector(Strategy):
        def __init__(self) -> None:
            self.server_round = 0
            self.aggregate: list[np.ndarray] | None = None
            self.reports: dict[str, SiteReport] = {}
            self.invalid: dict[str, str] = {}
            self.num_examples: dict[str, int] = {}
            self.sampled = 0
            self.failures: list[str] = []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            available = client_manager.num_available()
            n = max(int(available * cfg.fraction_train), cfg.min_train_nodes)
            client_manager.wait_for(max(n, cfg.min_available_nodes), timeout=cfg.round_timeout)
            clients = client_manager.sample(num_clients=n, min_num_clients=max(n, cfg.min_available_nodes))
            self.sampled = len(clients)
            if self.sampled > MAX_SITES:
                raise SecAggRoundFailed(f"SecAgg+ here supports at most {MAX_SITES} sites per round")
            config = {SERVER_ROUND: int(server_round), SECAGG_MAX_WEIGHT: float(MAX_WEIGHT)}
            return [(c, FitIns(parameters, dict(config))) for c in clients]

        def aggregate_fit(self, server_round, results, failures):
            # Failures are recorded by kind only: a site's own error text never reaches the run log.
            self.failures = [type(f).__name__ for f in failures]
            if not results:
                return None, {}
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            for proxy, res in results:
                node = str(proxy.node_id)
                count = res.num_examples
                if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_WEIGHT:
                    self.invalid[node] = f"claimed weight {count!r} is not a whole number in [1, {MAX_WEIGHT:g}]"
                try:
                    self.reports[node] = SiteReport.from_metrics(res.metrics, MESSAGE_TRAIN)
                except ProtocolError as exc:
                    self.invalid[node] = str(exc)
                self.num_examples[node] = int(count) if isinstance(count, int) else 0
            return results[0][1].parameters, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return Collector()


class SecAggTrainer:
    """Runs the training half of each round with Flower's SecAgg+ workflow."""

    def __init__(self, grid: Grid, context: Context, cfg: RunConfig) -> None:
        from flwr.server import ServerConfig
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow

        if cfg.secagg_shares < 3 or cfg.secagg_threshold < 2 or cfg.secagg_threshold >= cfg.secagg_shares:
            raise ValueError("run-config secagg needs secagg-shares >= 3 and 2 <= secagg-threshold < secagg-shares "
                             f"(got {cfg.secagg_shares}, {cfg.secagg_threshold})")
        self.cfg = cfg
        self.grid = grid
        self.collector = _legacy_collector(cfg)
        strategy = self.collector
        if cfg.dp == "client":
            from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

            # Clipping happens at the site (fixedclipping_mod); this wrapper sends the norm and adds the noise.
            strategy = DifferentialPrivacyClientSideFixedClipping(self.collector, cfg.dp_noise, cfg.dp_clip,
                                                                  max(1, cfg.min_train_nodes))
        self.dp_wrapper = strategy if cfg.dp == "client" else None
        self.context = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_server_rounds),
                                     strategy=strategy)
        self.workflow = SecAggPlusWorkflow(
            num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
            max_weight=MAX_WEIGHT, clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE, timeout=cfg.round_timeout)
        self._thread, self._stop, done = start_update_client_manager_thread(grid, self.context.client_manager)
        done.wait()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def train_round(self, server_round: int, arrays: ArrayRecord) -> SecAggResult:
        from flwr.app import ConfigRecord
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        c = self.collector
        c.aggregate, c.reports, c.invalid, c.num_examples, c.failures = None, {}, {}, {}, []
        if self.dp_wrapper is not None:
            # Noise is calibrated to the number of sites sampled; known once the client manager is filled.
            n = max(int(self.context.client_manager.num_available() * self.cfg.fraction_train),
                    self.cfg.min_train_nodes)
            self.dp_wrapper.num_sampled_clients = n
        # fedrad's wire format (fedrad.common.packing): the legacy FitIns carries one array per dtype.
        self.context.state.array_records[MAIN_PARAMS_RECORD] = pack(arrays)
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: 0.0})
        self.workflow(PromptGrid(self.grid), self.context)  # its 4 exchanges poll at 0.2 s, not Flower's 3 s
        if c.aggregate is None:
            why = "; ".join(c.failures[:3]) or "no site completed the SecAgg+ protocol"
            raise SecAggRoundFailed(
                f"SecAgg+ round {server_round} aggregated nothing ({c.sampled} sites sampled, "
                f"threshold {self.cfg.secagg_threshold}): {why}. Check that every site runs fedrad's ClientApp "
                "with secagg support and that no more sites dropped than the threshold allows.")
        n_summed = len(c.num_examples)
        if c.invalid:
            # A masked sum cannot drop one site's part: refuse the whole aggregate, keep the weights.
            why = "; ".join(f"node {n}: {r}" for n, r in sorted(c.invalid.items())[:3])
            return SecAggResult(None, {}, c.reports, c.sampled, 0, c.failures,
                                f"SecAgg+ aggregate refused, a site broke the protocol ({why})")
        # The workflow stored what the strategy returned: the mean update, plus the DP wrapper's noise if any.
        mean_update = self.context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        try:
            updated = apply_mean_update(arrays, mean_update, self.cfg.local_steps)
        except SecAggRoundFailed as exc:
            return SecAggResult(None, {}, c.reports, c.sampled, 0, c.failures, f"{exc}: the global model is kept")
        weights = {k: float(min(v, MAX_WEIGHT)) for k, v in c.num_examples.items()}
        log(INFO, "fedrad: [round %d] SecAgg+ summed %d/%d site updates", server_round, n_summed, c.sampled)
        return SecAggResult(updated, weighted_means(c.reports, weights), c.reports, c.sampled, n_summed,
                            c.failures)


def weighted_means(reports: dict[str, SiteReport], weights: dict[str, float]) -> dict[str, float]:
    """The round's metrics as plain mode's strategies compute them: the weighted mean of every AGGREGATE
    metric that all the sites sent."""
    values = {n: r.values(AGGREGATE) for n, r in reports.items()}
    common = set.intersection(*(set(v) for v in values.values())) if values else set()
    total = sum(weights[n] for n in values)
    return {k: sum(weights[n] * v[k] for n, v in values.items()) / total for k in sorted(common)} if total else {}


def apply_mean_update(arrays: ArrayRecord, mean_update: list[np.ndarray], local_steps: int) -> ArrayRecord:
    """Global weights + the unmasked mean update (packed, one array per dtype of the global model, as the
    sites sent it), in the model's dtypes; integer buffers + local_steps."""
    try:
        update = split(mean_update, Layout.of(arrays))
    except PackingError as exc:
        raise SecAggRoundFailed(f"SecAgg+ returned arrays that are not the packed model: {exc}") from None
    out = {}
    for key, ref in arrays.items():
        base = ref.numpy()
        upd = update[key]
        if base.dtype.kind in "iu":
            new = (base + int(local_steps)).astype(base.dtype)
        else:
            new = (base.astype(np.float64) + upd).astype(base.dtype)
            if not np.isfinite(new).all():
                raise SecAggRoundFailed(f"SecAgg+ aggregate of '{key}' is not finite")
        out[key] = Array(np.array(new, order="C"))
    return ArrayRecord(out)


def quantisation_tolerance(site_weights: list[float]) -> float:
    """Worst-case per-element error of the unmasked mean from SecAgg+'s fixed-point rounding (tests use it)."""
    ratios = [min(w, MAX_WEIGHT) / MAX_WEIGHT for w in site_weights]
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    # one stochastic rounding per site plus the weight's rounding; 4x margin (seen: errors of ~4 steps/site)
    return 4 * (len(ratios) + 1) * step / max(sum(ratios), 1e-12)
