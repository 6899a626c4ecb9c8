"""Typed view of the Flower run-config (pyproject `[tool.flwr.app.config]`), shared by both apps.

Flower hands run-config over as a flat dict of TOML scalars; both the ServerApp and the ClientApp read
it through `RunConfig.from_flower` so a misspelt or mistyped key fails loudly, naming the key. Every run-config
rule is here (the privacy modes, per-sample DP, FedProx, SecAgg+ compatibility): `fedrad run` before submission,
the coordinator and each site build this one type, so all three refuse the same config with the same line.
A pydantic model (fedrad.common.schema.Schema, via Recipe): copy one with `cfg.replace(key=value)`, list its
keys with `RunConfig.model_fields`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

from fedrad.common.recipe import Recipe
from fedrad.common.schema import Rule

# Aggregation strategies by run-config name, each with the reason it cannot run under SecAgg+ (None: it
# can). SecAgg+ unmasks only the weighted sum of the sites' updates, so only a weighted mean of updates
# runs on it; fedprox qualifies (its proximal term is applied at the sites). server/strategies.py maps each
# name to Flower's class.
_NEEDS_EACH_UPDATE = "needs each site's update, and SecAgg+ reveals only their sum"
_SERVER_OPTIMISER = "applies a server-side optimiser that fedrad's SecAgg+ path does not run (it applies the mean)"
# Differential-privacy modes by run-config name (docs/PRIVACY.md): none; client = site-level (update clipping +
# noise at the coordinator); sample = image-level DP-SGD at each site. The site policy's dp_modes use these names.
DP_MODES = ("none", "client", "sample")

STRATEGY_NAMES: dict[str, str | None] = {
    "fedavg": None,
    "fedprox": None,
    "fedavgm": _SERVER_OPTIMISER,
    "fedadam": _SERVER_OPTIMISER,
    "fedyogi": _SERVER_OPTIMISER,
    "fedmedian": _NEEDS_EACH_UPDATE,
    "fedtrimmedavg": _NEEDS_EACH_UPDATE,
    "krum": _NEEDS_EACH_UPDATE,
    "multikrum": _NEEDS_EACH_UPDATE,
}



class RunConfig(Recipe):
    """A federated run: the training recipe (fedrad.common.recipe.Recipe: model, objective, optimiser, schedule,
    augmentations, with their defaults and range checks) plus the federation's own keys below."""

    _where: ClassVar[str] = "run-config"

    num_server_rounds: int = 3
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 900.0
    # true: no evaluate message; each train reply carries its site's held-out metrics of the received global
    # weights, measured before training (one message per round instead of two; server/rounds.py).
    eval_in_train: bool = False
    # true: mean strategies screen and average the train replies one at a time, each update spilled to a temp
    # file in the run folder, so the coordinator holds ~2 model copies however many sites answer (large models
    # with many sites); false: all replies in memory, no disk traffic (server/screening.py).
    spill_updates: bool = False
    # Optimiser steps each site takes per round (`fedrad pretrain --steps` counts its whole run instead).
    local_steps: int = 10
    # Strategy knobs (used by the strategies that take them).
    server_lr: float = 1.0
    server_momentum: float = 0.9
    proximal_mu: float = 0.01
    trimmed_beta: float = 0.2
    krum_byzantine: int = 0
    # Update screening before aggregation (server/screening.py): an update whose distance to the global model
    # is more than this many times the round's median distance is rejected (0 disables). It does not catch
    # an update pointed elsewhere at a normal norm (e.g. a sign flip): see server/screening.py.
    norm_outlier_factor: float = 3.0
    # A site's claimed example count is cut to the maximum the operator declared for its enrolled name in
    # site-max-examples (a TOML file on the coordinator: `"site-a" = 5000` lines), else to
    # max-example-factor x the round's median (0 disables), and to max-example-growth x its own last
    # accepted count (0 disables); no site without a declared maximum has a weight share above
    # max-site-share (1 disables; fewer than 1/share such sites: equal weights). See server/screening.py.
    max_example_factor: float = 1.5
    max_site_share: float = 0.5
    site_max_examples: str = ""
    max_example_growth: float = 2.0
    # Run directory (checkpoints, metrics.jsonl, plots); empty: runs/<timestamp> under the cwd.
    run_dir: str = ""
    resume: bool = False
    # Checkpoints kept in the run directory: the newest K rounds (the latest, which resume reads, always among
    # them); 0 keeps every round's (a weeks-long run writes one model per round).
    keep_checkpoints: int = 5
    # Privacy (see docs/PRIVACY.md).
    secagg: bool = False
    secagg_shares: int = 3
    secagg_threshold: int = 2
    dp: str = "none"
    dp_clip: float = 10.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_epsilon_budget: float = 0.0
    # Representation monitor (client/app/probe_monitor.py): a label column each site may allow in its policy's
    # label_fields ("finding", "view", ...); each evaluation embeds up to probe-monitor-images of its labelled
    # images and sends only k-NN and linear-probe AUCs. Empty: off.
    probe_monitor: str = ""
    probe_monitor_images: int = 512
    # The consortium's signature over the FAB and this config (fedrad.common.run_signature); set by
    # `fedrad run --sign-key`, checked by each site's runtime before its data is touched.
    run_signature: str = ""
    # Release distribution (fedrad.server.publish): the coordinator's folder of published bundles. Set, the
    # ServerApp first offers its latest release to every connected site; publish-only runs do nothing else and
    # keep serving sites that connect for publish-linger seconds (`fedrad publish`).
    publish_dir: str = ""
    publish_only: bool = False
    publish_linger: float = 0.0

    def _check(self) -> None:
        """Refuse what cannot run as configured, naming the key: `fedrad run` (before submission), the
        ServerApp and every site build a RunConfig, so all refuse."""
        name = self.strategy.lower()
        if name not in STRATEGY_NAMES:
            raise Rule(f"run-config 'strategy': unknown '{self.strategy}', choose one of "
                       f"{', '.join(STRATEGY_NAMES)}", 'strategy')
        if self.secagg and STRATEGY_NAMES[name] is not None:
            raise Rule(f"run-config secagg=true cannot run strategy '{self.strategy}': it {STRATEGY_NAMES[name]}. "
                       "Use strategy=fedavg or fedprox with secagg, or secagg=false.", "strategy")
        if self.norm_outlier_factor < 0 or self.max_example_factor < 0 or self.max_example_growth < 0:
            raise Rule("run-config 'norm-outlier-factor', 'max-example-factor' and 'max-example-growth' "
                       "must be >= 0 (0 disables)", 'norm_outlier_factor')
        if not 0 < self.max_site_share <= 1:
            raise Rule("run-config 'max-site-share' must be in (0, 1]", 'max_site_share')
        if self.publish_linger < 0 or (self.publish_only and not self.publish_dir):
            raise Rule("run-config 'publish-linger' must be >= 0, and publish-only needs 'publish-dir'",
                       "publish_linger" if self.publish_linger < 0 else "publish_only")
        self._check_recipe()
        if not 0 <= self.warmup_rounds < max(self.num_server_rounds, 1):
            raise Rule("run-config 'warmup-rounds' must be >= 0 and below num-server-rounds", 'warmup_rounds')
        self._check_monitor()
        self._check_privacy()

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """The RunConfig of Flower's run-config dict, parsed and checked once: the site's mods and handlers of a
        message (and a warm worker's later messages of the same run) share one frozen object."""
        items = tuple(sorted(run_config.items()))
        try:
            hash(items)
        except TypeError:  # not TOML scalars: from_flower names the key
            return cls.from_flower(dict(run_config))
        return _parsed(items)

    def _check_privacy(self) -> None:
        """The privacy keys: refuse settings that cannot mean what they say (the coordinator, `fedrad run` and
        every site build a RunConfig, so all three refuse the same way)."""
        if self.dp not in DP_MODES:
            raise Rule(f"run-config 'dp': unknown '{self.dp}', choose one of {', '.join(DP_MODES)}", 'dp')
        if self.dp == "none":
            return
        if self.dp_noise <= 0:
            raise Rule(f"run-config dp={self.dp} needs 'dp-noise' > 0 (the noise multiplier); "
                       "with no noise there is no privacy guarantee", 'dp_noise')
        if self.dp_clip <= 0:
            raise Rule("run-config 'dp-clip' must be > 0", 'dp_clip')
        if not 0 < self.dp_delta < 1:
            raise Rule("run-config 'dp-delta' must be in (0, 1)", 'dp_delta')
        if self.dp == "client" and self.strategy.lower() != "fedavg":
            raise Rule(f"run-config dp=client works with strategy=fedavg only (the noise is calibrated to an "
                       f"equal-weight mean of clipped updates), not '{self.strategy}'", 'dp')
        if self.dp == "sample":
            from fedrad.common.losses import per_sample_objectives

            per_sample = per_sample_objectives()
            if self.objective.lower() not in per_sample:
                raise Rule(f"run-config dp=sample needs a per-sample objective ({', '.join(per_sample)}); "
                           f"'{self.objective}' couples the images of a batch (NT-Xent/SupCon/MICLe compare every "
                           "image with every other), so per-sample clipping would not bound one image's influence and "
                           f"the reported epsilon would be false. Use objective={' or '.join(per_sample)}, or "
                           "dp=client for a site-level guarantee.", "objective")
            if self.secagg:
                raise Rule("run-config dp=sample with secagg=true is not supported; use dp=client with secagg", 'dp')
            if self.strategy.lower() == "fedprox":
                raise Rule("run-config dp=sample does not combine with strategy=fedprox (its proximal "
                           "gradient term is not clipped per image); choose another strategy", 'dp')
            if self.eval_in_train:
                raise Rule("run-config dp=sample does not combine with eval-in-train: the held-out metrics "
                           "would leave the sites un-noised (sites refuse it; under dp=sample no evaluation "
                           "is sent)", 'dp')

    @property
    def fedprox_mu(self) -> float:
        """The proximal weight each site adds to its loss: proximal-mu under strategy fedprox, else 0 (the other
        strategies ignore the key)."""
        return self.proximal_mu if self.strategy.lower() == "fedprox" and self.proximal_mu > 0 else 0.0

    def _check_monitor(self) -> None:
        """probe-monitor names one label column, never one SupCon trains on (its AUCs would flatter the model), and
        stays off under per-image DP; probe-monitor-images bounds what a site embeds per evaluation."""
        if not 16 <= self.probe_monitor_images <= 4096:
            raise Rule("run-config 'probe-monitor-images' must be in [16, 4096]", 'probe_monitor_images')
        column = self.probe_monitor
        if column != column.strip() or "," in column:
            raise Rule(f"run-config 'probe-monitor': {column!r} is not one label column name", 'probe_monitor')
        if column and self.dp == "sample":
            raise Rule("run-config 'probe-monitor' cannot run with dp = \"sample\": its AUCs of the sites' "
                       "labels would leave outside their image-level epsilon accounting")
        if column and column in self.label_field_list:
            from fedrad.common.losses import REGISTRY

            objective = REGISTRY.get(self.objective.lower())
            if objective is not None and objective().needs_labels:
                raise Rule(f"run-config 'probe-monitor' = {column!r} is one of the label-fields objective "
                           f"'{self.objective}' trains on: monitor a column the model does not learn from",
                           "probe_monitor")

    def round_lr(self, server_round: int) -> float:
        """The learning rate of `server_round` (1-based) under this run's schedule."""
        return self.recipe_lr(server_round, self.num_server_rounds)

    @property
    def aggregation(self) -> str:
        """The aggregation that actually runs (summary.json and the release manifest name it)."""
        name = self.strategy.lower()
        if self.secagg:
            return f"{name}: weighted mean of SecAgg+-masked updates (sum unmasked only)"
        if self.dp == "client":
            return f"{name}: equal-weight mean of clipped updates + Gaussian noise (server-side DP)"
        return name

    @property
    def model_norm(self) -> str:
        """The `norm` key, but GroupNorm whenever sites train with per-image DP-SGD (BatchNorm mixes the images
        of a batch, so per-image clipping would not bound one image's influence)."""
        return "group" if self.dp == "sample" else self.norm


@lru_cache(maxsize=8)
def _parsed(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_flower(dict(items))
