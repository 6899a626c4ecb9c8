"""How one round's training half runs in each mode: plain, client-level DP, SecAgg+.

Each mode does configure -> send/receive -> screen -> aggregate for training and says what the round's
line adds (privacy numbers) and what a checkpoint must keep; the skeleton in fedrad.server.rounds does the
rest (evaluation, record, checkpoint, plots) the same way for all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrad.common.protocol import MESSAGE_TRAIN, ROUND_LR, RUN_KEY, SERVER_ROUND, ErrorCode, SiteReport, error_code_of
from fedrad.common.run_config import RunConfig
from fedrad.server.exchange import RoundTimes, arriving_replies, exchange
from fedrad.server.privacy import PrivacyLedger, wrap_dp_strategy
from fedrad.server.run_log import read_metrics
from fedrad.server.screening import (
    CountBounds,
    ScreeningRules,
    UpdateSpill,
    drain,
    error_summary,
    read_site_maxima,
    screen_replies,
    screen_stream,
)
from fedrad.server.site_names import SiteNames
from fedrad.server.strategies import STRATEGY_SPECS


class RoundStop(Exception):
    """Stop the run cleanly before this round (e.g. a privacy budget); the text goes to summary.json."""


@dataclass
class TrainOutcome:
    arrays: ArrayRecord | None  # the accepted aggregate; None keeps the global model
    metrics: dict[str, Any]  # aggregated train metrics for the round's line
    sent: int
    answered: int
    aggregated: int
    reports: dict[str, SiteReport] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    capped: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None  # why an aggregate was not accepted


def screening_rules(cfg: RunConfig) -> ScreeningRules:
    """Under dp=client the clipping bounds every site's influence and the noise assumes an unweighted mean
    of every sampled site, so the norm screen is off and weights are equal."""
    dp_client = cfg.dp == "client"
    return ScreeningRules(norm_factor=0.0 if dp_client else cfg.norm_outlier_factor,
                          max_example_factor=cfg.max_example_factor, max_site_share=cfg.max_site_share,
                          equal_weights=dp_client, max_example_growth=cfg.max_example_growth)


class PlainRounds:
    """The coordinator sees each site's update: screen it, then Flower's strategy aggregates."""

    def __init__(self, grid: Grid, cfg: RunConfig, strategy, run_key: str, run_dir: Path) -> None:
        self.grid, self.cfg, self.strategy, self.run_key, self.run_dir = grid, cfg, strategy, run_key, run_dir
        self.train_strategy = strategy
        self.rules = screening_rules(cfg)
        # each site's count over the run: its declared maximum (by enrolled name) and its last accepted count
        declared = read_site_maxima(cfg.site_max_examples)
        names = SiteNames(grid) if declared else None
        self.bounds = CountBounds(declared, names.refresh if names is not None else dict)

    def stop_before(self, rnd: int) -> str | None:
        """dp=sample: stop when a site's projected ε for this round would pass the budget."""
        cfg = self.cfg
        if cfg.dp != "sample" or cfg.dp_epsilon_budget <= 0:
            return None
        rows = read_metrics(self.run_dir)
        nxt = [float(m["dp_epsilon_next"]) for m in ((rows[-1].get("sites") or {}).values() if rows else ())
               if "dp_epsilon_next" in m]
        if nxt and max(nxt) > cfg.dp_epsilon_budget:
            return (f"dp-epsilon-budget {cfg.dp_epsilon_budget:g} reached: round {rnd} would bring a site's "
                    f"image-level epsilon to {max(nxt):.4f} (delta {cfg.dp_delta:g}); stopped after round {rnd - 1}")
        return None

    def train(self, rnd: int, arrays: ArrayRecord, times: RoundTimes) -> TrainOutcome:
        t0 = time.perf_counter()
        msgs = list(self.train_strategy.configure_train(
            rnd, arrays, ConfigRecord({SERVER_ROUND: rnd, RUN_KEY: self.run_key, ROUND_LR: self.cfg.round_lr(rnd)}),
            self.grid))
        self._sampled(len(msgs))
        times.send += time.perf_counter() - t0
        if self.cfg.spill_updates and self.train_strategy is self.strategy and \
                STRATEGY_SPECS[self.cfg.strategy.lower()].mean:
            kept, report, agg, metrics, answered, t_agg = self._train_streamed(rnd, arrays, msgs, times)
        else:
            replies = exchange(self.grid, msgs, self.cfg.round_timeout, times)
            t_agg = time.perf_counter()
            answered = sum(not m.has_error() for m in replies)
            if msgs and not answered:
                self._nothing_back(rnd, msgs, replies)
            # drained: each packed reply is let go once screening has unpacked it
            kept, report = screen_replies(drain(replies), arrays, self.rules, MESSAGE_TRAIN, self.bounds)
            del replies
            agg, metrics = self.train_strategy.aggregate_train(rnd, kept)
        # Per-site records: rejected sites' claims too; an accepted site's count as it was counted.
        reports = {str(n): replace(r, num_examples=report.counted.get(n, r.num_examples))
                   for n, r in report.reports.items()}
        out = TrainOutcome(agg, dict(metrics or {}), len(msgs), answered, len(kept) if agg is not None else 0,
                           reports,
                           {str(n): r for n, r in report.rejected.items()},
                           {str(n): r for n, r in report.capped.items()},
                           getattr(self.strategy, "last_refusal", None) if agg is None else None)
        times.aggregate += time.perf_counter() - t_agg
        return out

    def _train_streamed(self, rnd: int, arrays: ArrayRecord, msgs: list[Message], times: RoundTimes):
        """spill-updates: each reply is screened and spilled to disk as it is pulled, then the mean is built one
        array at a time, so the coordinator holds a small constant number of model copies however many sites
        answer. Error replies (no arrays) are kept for the round's refusal message."""
        errors: list[Message] = []
        answered = 0

        def arriving():
            nonlocal answered
            for reply in arriving_replies(self.grid, msgs, self.cfg.round_timeout, times):
                if reply.has_error():
                    errors.append(reply)
                else:
                    answered += 1
                yield reply

        with UpdateSpill(arrays, self.run_dir) as spill:
            kept, report = screen_stream(arriving(), arrays, self.rules, spill, self.bounds)
            t_agg = time.perf_counter()
            if msgs and not answered:
                self._nothing_back(rnd, msgs, errors)
            agg, metrics = self.train_strategy.aggregate_screened(rnd, kept, spill)
        return kept, report, agg, metrics, answered, t_agg

    def _sampled(self, n: int) -> None:
        """Hook: the DP wrapper calibrates its noise to the number of sites sampled."""

    def _nothing_back(self, rnd: int, msgs: list[Message], replies: list[Message]) -> None:
        codes = [error_code_of(m.error.code) for m in replies if m.has_error()]
        if codes and all(c == ErrorCode.PRIVACY_BUDGET for c in codes):
            raise RoundStop(f"dp-epsilon-budget {self.cfg.dp_epsilon_budget:g} reached: every site refused round "
                            f"{rnd} (its privacy budget would be passed); stopped after round {rnd - 1}")
        reasons = sorted({error_summary(m) for m in replies if m.has_error()})[:3]
        raise RuntimeError(f"round {rnd}: none of {len(msgs)} sites returned a result "
                           f"({'; '.join(reasons) or 'no replies'}): refusing to go on training nothing")

    def privacy_entry(self, rnd: int, outcome: TrainOutcome) -> dict[str, Any]:
        """dp=sample: the round's ε is the worst site's (the strategy would have averaged it)."""
        if self.cfg.dp != "sample":
            return {}
        eps = [r.dp_epsilon for r in outcome.reports.values() if r.dp_epsilon is not None]
        return {"dp_epsilon": max(eps) if eps else None, "dp_delta": self.cfg.dp_delta}

    def checkpoint_info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class ClientLedger:
    """dp=client: the site-level (ε, δ) ledger, its budget check before a round and its record after."""

    def __init__(self, grid: Grid, cfg: RunConfig, restored: list) -> None:
        self.grid, self.cfg = grid, cfg
        self.ledger = PrivacyLedger.for_run(cfg, max(cfg.min_available_nodes, len(list(grid.get_node_ids()))))
        self.ledger.restore(restored)

    def stop_before(self, rnd: int) -> str | None:
        expected = max(int(len(list(self.grid.get_node_ids())) * self.cfg.fraction_train), self.cfg.min_train_nodes)
        exceed, eps_next = self.ledger.would_exceed(expected)
        if not exceed:
            return None
        return (f"dp-epsilon-budget {self.cfg.dp_epsilon_budget:g} reached: round {rnd} would bring epsilon from "
                f"{self.ledger.epsilon:.4f} to {eps_next:.4f} (delta {self.cfg.dp_delta:g}); stopped after round "
                f"{rnd - 1}")

    def record(self, rnd: int, outcome: TrainOutcome) -> dict[str, Any]:
        eps = self.ledger.record(rnd, outcome.sent, outcome.aggregated if outcome.arrays is not None else 0)
        return {"dp_epsilon": eps, "dp_delta": self.cfg.dp_delta}


class ClientDPRounds(PlainRounds):
    """Plain transport, Flower's server-side clipping + noise wrapper, and the site-level ledger."""

    def __init__(self, grid: Grid, cfg: RunConfig, strategy, run_key: str, run_dir: Path, restored: list) -> None:
        super().__init__(grid, cfg, strategy, run_key, run_dir)
        self.train_strategy = wrap_dp_strategy(strategy, cfg, cfg.min_train_nodes)
        self.ledger = ClientLedger(grid, cfg, restored)

    def stop_before(self, rnd: int) -> str | None:
        return self.ledger.stop_before(rnd)

    def _sampled(self, n: int) -> None:
        self.train_strategy.num_sampled_clients = max(1, n)

    def privacy_entry(self, rnd: int, outcome: TrainOutcome) -> dict[str, Any]:
        return self.ledger.record(rnd, outcome)

    def checkpoint_info(self) -> dict[str, Any]:
        return {"privacy_rounds": self.ledger.ledger.rounds}

    @property
    def privacy_ledger(self) -> PrivacyLedger:
        return self.ledger.ledger


class SecAggRounds:
    """SecAgg+ transport (Flower's legacy workflow); with dp=client, clipping at the sites and the ledger."""

    def __init__(self, grid, context, cfg: RunConfig, restored: list) -> None:
        from fedrad.server.secagg import SecAggTrainer

        self.cfg = cfg
        self.trainer = SecAggTrainer(grid, context, cfg)
        self.ledger = ClientLedger(grid, cfg, restored) if cfg.dp == "client" else None

    def stop_before(self, rnd: int) -> str | None:
        return self.ledger.stop_before(rnd) if self.ledger else None

    def train(self, rnd: int, arrays: ArrayRecord, times: RoundTimes) -> TrainOutcome:
        """Flower's SecAgg+ workflow sends, waits and aggregates itself: only `times.train` covers it."""
        res = self.trainer.train_round(rnd, arrays)
        if res.refusal:
            log(WARNING, "fedrad: [round %d] %s", rnd, res.refusal)
        return TrainOutcome(res.arrays, res.metrics, res.sampled, res.aggregated, res.aggregated,
                            res.reports, refusal=res.refusal)

    def privacy_entry(self, rnd: int, outcome: TrainOutcome) -> dict[str, Any]:
        return self.ledger.record(rnd, outcome) if self.ledger else {}

    def checkpoint_info(self) -> dict[str, Any]:
        return {"privacy_rounds": self.ledger.ledger.rounds} if self.ledger else {}

    @property
    def privacy_ledger(self) -> PrivacyLedger | None:
        return self.ledger.ledger if self.ledger else None

    def close(self) -> None:
        self.trainer.close()


def round_mode(grid: Grid, context, cfg: RunConfig, strategy, run_key: str, run_dir: Path, restored: list):
    """The mode this run-config asks for."""
    if cfg.secagg:
        mode: Any = SecAggRounds(grid, context, cfg, restored)
    elif cfg.dp == "client":
        mode = ClientDPRounds(grid, cfg, strategy, run_key, run_dir, restored)
    else:
        mode = PlainRounds(grid, cfg, strategy, run_key, run_dir)
    log(INFO, "fedrad: rounds run in %s mode; aggregation: %s", type(mode).__name__, cfg.aggregation)
    return mode
