"""Client-level differential privacy on the coordinator: Flower's DP wrapper and the privacy ledger (the run-config
rules live in fedrad.common.run_config.RunConfig, which the coordinator, `fedrad run` and every site build).

Mechanism (dp = "client"): each site's model update (local weights minus the global weights it received)
is clipped to L2 norm `dp-clip`; the coordinator averages the clipped updates with equal weights and adds
Gaussian noise of standard deviation `dp-noise * dp-clip / sampled_sites` (Flower's
DifferentialPrivacyServerSideFixedClipping; with SecAgg+ the clipping moves to the site, Flower's
`fixedclipping_mod`, and the noise is added by the legacy DifferentialPrivacyClientSideFixedClipping).

Accounting: Flower's RdpAccountant (dp-accounting's RDP), one sampled-Gaussian release per round, with no
amplification by sampling claimed (every round may pick the same sites). The result is a *site-level*
(ε, δ) guarantee: the released models are nearly as likely whether or not any one hospital took part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.common.logger import log

from fedrad.common.run_config import RunConfig


@dataclass
class PrivacyLedger:
    """Site-level (ε, δ) spent so far under dp=client, with Flower's RdpAccountant."""

    noise_multiplier: float
    clip: float
    delta: float
    budget: float  # 0: no budget
    population: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    _accountant: Any = None

    @classmethod
    def for_run(cls, cfg: RunConfig, population: int) -> PrivacyLedger:
        ledger = cls(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, cfg.dp_epsilon_budget, max(1, population))
        ledger._accountant = ledger._new()
        return ledger

    def _new(self):
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        return RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def _event(self, sampled: int, aggregated: int | None = None):
        from flwr.serverapp import GaussianPrivacyEvent

        aggregated = sampled if aggregated is None else aggregated
        # The noise is calibrated to `sampled` sites; averaging over fewer makes one site's weight larger,
        # so the effective multiplier shrinks in proportion.
        sigma = self.noise_multiplier * aggregated / max(1, sampled)
        return GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=min(self.population, max(1, sampled)),
                                    population_size=self.population)

    @property
    def epsilon(self) -> float:
        if not self.rounds:
            return 0.0
        return float(self._accountant.get_epsilon(self.delta))

    def would_exceed(self, sampled: int) -> tuple[bool, float]:
        """Whether one more round over `sampled` sites would take ε past the budget, and that ε."""
        projected = self._new()
        for r in self.rounds:
            projected.compose(self._event(r["sampled"], r["aggregated"]))
        projected.compose(self._event(sampled))
        eps = float(projected.get_epsilon(self.delta))
        return (self.budget > 0 and eps > self.budget), eps

    def record(self, server_round: int, sampled: int, aggregated: int) -> float:
        if aggregated <= 0:
            return self.epsilon  # nothing released
        self._accountant.compose(self._event(sampled, aggregated))
        self.rounds.append({"round": server_round, "sampled": sampled, "aggregated": aggregated})
        eps = self.epsilon
        log(INFO, "fedrad: [round %d] privacy spent: epsilon=%.4f at delta=%g (site-level, RDP)",
            server_round, eps, self.delta)
        return eps

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        self._accountant = self._new()
        self.rounds = []
        for r in rounds:
            self._accountant.compose(self._event(int(r["sampled"]), int(r["aggregated"])))
            self.rounds.append({k: int(r[k]) for k in ("round", "sampled", "aggregated")})


def wrap_dp_strategy(strategy, cfg: RunConfig, num_sampled: int):
    """Flower's server-side fixed-clipping DP wrapper around the (screened) FedAvg; equal site weights."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    # Clipping bounds each site's influence; a norm-outlier rule on top would drop sites from a mean whose
    # noise is calibrated to all of them.
    strategy.outlier_factor = 0.0
    dp = DifferentialPrivacyServerSideFixedClipping(strategy, cfg.dp_noise, cfg.dp_clip, max(1, num_sampled))
    return dp


def privacy_summary(cfg: RunConfig, ledger: PrivacyLedger | None, rounds_done: int, sites: int,
                    site_epsilons: dict[str, float] | None = None) -> dict[str, Any]:
    """The `privacy` block of summary.json (the release manifest copies it)."""
    transport = "SecAgg+ (Flower secaggplus): the coordinator sees only the sum of masked updates" if cfg.secagg \
        else "plain: the coordinator sees each site's model update"
    out: dict[str, Any] = {"secure_aggregation": bool(cfg.secagg), "aggregation": transport, "dp": cfg.dp,
                           "rounds": rounds_done, "sites": sites}
    if cfg.secagg:
        out["secagg"] = {"shares": cfg.secagg_shares, "threshold": cfg.secagg_threshold}
    if cfg.dp == "client" and ledger is not None:
        out.update({
            "mechanism": "client-level DP: per-site update clipping + Gaussian noise on the mean "
                         f"({'clipped at the site, noise at the coordinator' if cfg.secagg else 'server-side'}"
                         " fixed clipping, Flower)",
            "unit": "site (hospital): neighbouring runs differ by one whole site's data",
            "clipping_norm": cfg.dp_clip, "noise_multiplier": cfg.dp_noise,
            "epsilon": round(ledger.epsilon, 6) if ledger.rounds else 0.0, "delta": cfg.dp_delta,
            "epsilon_budget": cfg.dp_epsilon_budget or None,
            "accountant": "RDP (Flower RdpAccountant / dp-accounting), no sampling amplification",
            "releases": len(ledger.rounds),
            "formal_guarantee": True,
        })
    elif cfg.dp == "sample":
        eps = sorted((site_epsilons or {}).values())
        out.update({
            "mechanism": "sample-level DP-SGD at each site (opacus, per-image clipping + noise), objective "
                         f"{cfg.objective}",
            "unit": "image: neighbouring datasets differ by one image at one site",
            "clipping_norm": cfg.dp_clip, "noise_multiplier": cfg.dp_noise, "delta": cfg.dp_delta,
            "site_epsilons": site_epsilons or {}, "epsilon": eps[-1] if eps else None,
            "accountant": "RDP (opacus), per site, over all local steps of all rounds",
            "formal_guarantee": bool(eps) and all(math.isfinite(e) for e in eps),
        })
    else:
        out.update({"mechanism": "none", "epsilon": None, "delta": None, "formal_guarantee": False,
                    "statement": "No formal privacy guarantee: the released weights were trained without "
                                 "differential privacy and may leak information about training images "
                                 "(e.g. by model inversion or membership inference)."})
    return out
