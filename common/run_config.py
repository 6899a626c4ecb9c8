"""Typed view of the Flower run-config (pyproject `[tool.flwr.app.config]`), shared by both apps.

Flower hands run-config over as a flat dict of TOML scalars; both the ServerApp and the ClientApp read
it through `RunConfig.from_flower` so a misspelt or mistyped key fails loudly, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Aggregation strategies by run-config name, each with the reason it cannot run under SecAgg+ (None: it
# can). SecAgg+ unmasks only the weighted sum of the sites' updates, so only a weighted mean of updates
# runs on it; fedprox qualifies (its proximal term is applied at the sites). server/strategies.py maps each
# name to Flower's class.
_NEEDS_EACH_UPDATE = "needs each site's update, and SecAgg+ reveals only their sum"
_SERVER_OPTIMISER = "applies a server-side optimiser that fedrad's SecAgg+ path does not run (it applies the mean)"
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

# The model's normalisation layers by run-config name (fedrad.common.norms.NORMS; repeated here so that reading a
# run config never imports torch; tests/test_norm_policy.py checks the two agree).
NORM_NAMES = ("batch", "group")


@dataclass(frozen=True)
class RunConfig:
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
    model: str = "resnet18"
    objective: str = "supcon"
    image_size: int = 64
    proj_dim: int = 128
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    temperature: float = 0.1
    label_fields: str = "view,body_part,sex,age"
    hflip: bool = False
    seed: int = 0
    # Normalisation layers of the model (fedrad.common.norms): "batch" (BatchNorm; FedAvg averages its running
    # statistics too) or "group" (GroupNorm: no batch or site statistics at all). dp = "sample" forces "group".
    # Chosen by measurement on label-skewed sites: README "Recipe switches", RESULTS.md "norm policy".
    norm: str = "batch"
    # The first global model (fedrad.common.init_weights): a local timm checkpoint file (e.g. ImageNet weights)
    # or an earlier release bundle folder, on the coordinator; init-pubkey verifies a bundle. Empty: random.
    init: str = ""
    init_pubkey: str = ""
    # The round's learning rate (fedrad.common.lr_schedule, timm's CosineLRScheduler over rounds): "constant"
    # or "cosine" from `lr` down to `lr-min`, after `warmup-rounds` of linear warm-up from lr-min.
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    lr_min: float = 0.0
    # Augmentations of the contrastive views (fedrad.common.augment, README "Recipe switches"): crop area range,
    # rotation (degrees), brightness shift, contrast factor, gamma in [1/g, g], blur and noise probabilities, the
    # largest noise std. 0 (1 for crop-min/gamma) switches a piece off. hflip stays off: laterality matters.
    aug_crop_min: float = 0.4
    aug_crop_max: float = 1.0
    aug_rotate: float = 10.0
    aug_brightness: float = 0.1
    aug_contrast: float = 0.2
    aug_gamma: float = 1.25
    aug_blur_p: float = 0.5
    aug_noise_p: float = 0.5
    aug_noise_std: float = 0.03
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
    # A site's claimed example count is cut to this many times the round's median (0 disables), and no
    # site's weight share exceeds max-site-share (1 disables; fewer than 1/share sites: equal weights).
    max_example_factor: float = 1.5
    max_site_share: float = 0.5
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
    # Representation monitor (client/probe_monitor.py): a label column each site may allow in its policy's
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

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Build from Flower's kebab-case dict; unknown keys are an error that names them."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                unknown.append(key)
                continue
            default = known[name].default
            try:
                if isinstance(default, bool):
                    values[name] = value if isinstance(value, bool) else str(value).lower() == "true"
                elif isinstance(default, int):
                    values[name] = int(value)
                elif isinstance(default, float):
                    values[name] = float(value)
                else:
                    values[name] = str(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"run-config key '{key}': cannot read {value!r} as {type(default).__name__}") from exc
        if unknown:
            raise ValueError(f"unknown run-config keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    def __post_init__(self) -> None:
        """Refuse what cannot run as configured, naming the key: both `fedrad run` (before submission) and
        the ServerApp build a RunConfig, so both refuse."""
        name = self.strategy.lower()
        if name not in STRATEGY_NAMES:
            raise ValueError(f"run-config 'strategy': unknown '{self.strategy}', choose one of "
                             f"{', '.join(STRATEGY_NAMES)}")
        if self.secagg and STRATEGY_NAMES[name] is not None:
            raise ValueError(f"run-config secagg=true cannot run strategy '{self.strategy}': it "
                             f"{STRATEGY_NAMES[name]}. Use strategy=fedavg or fedprox with secagg, or secagg=false.")
        if self.norm_outlier_factor < 0 or self.max_example_factor < 0:
            raise ValueError("run-config 'norm-outlier-factor' and 'max-example-factor' must be >= 0 (0 disables)")
        if not 0 < self.max_site_share <= 1:
            raise ValueError("run-config 'max-site-share' must be in (0, 1]")
        if self.publish_linger < 0 or (self.publish_only and not self.publish_dir):
            raise ValueError("run-config 'publish-linger' must be >= 0, and publish-only needs 'publish-dir'")
        self._check_recipe()
        self._check_monitor()

    def _check_recipe(self) -> None:
        """The schedule and augmentation keys, each refused by name when out of range."""
        from fedrad.common.lr_schedule import LR_SCHEDULES

        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"run-config 'lr-schedule': unknown '{self.lr_schedule}', choose one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_rounds < max(self.num_server_rounds, 1):
            raise ValueError("run-config 'warmup-rounds' must be >= 0 and below num-server-rounds")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError("run-config 'lr-min' must be in [0, lr]")
        if not 0 < self.aug_crop_min <= self.aug_crop_max <= 1:
            raise ValueError("run-config 'aug-crop-min' and 'aug-crop-max' must satisfy 0 < min <= max <= 1")
        if self.norm not in NORM_NAMES:
            raise ValueError(f"run-config 'norm': unknown '{self.norm}', choose one of {', '.join(NORM_NAMES)}")
        if not 0 <= self.aug_rotate <= 180:
            raise ValueError("run-config 'aug-rotate' must be in [0, 180] degrees")
        if not (0 <= self.aug_brightness < 1 and 0 <= self.aug_contrast < 1):
            raise ValueError("run-config 'aug-brightness' and 'aug-contrast' must be in [0, 1)")
        if self.aug_gamma < 1:
            raise ValueError("run-config 'aug-gamma' must be >= 1 (gamma is drawn in [1/g, g]; 1 switches it off)")
        if not (0 <= self.aug_blur_p <= 1 and 0 <= self.aug_noise_p <= 1):
            raise ValueError("run-config 'aug-blur-p' and 'aug-noise-p' must be probabilities in [0, 1]")
        if self.aug_noise_std < 0:
            raise ValueError("run-config 'aug-noise-std' must be >= 0")

    def _check_monitor(self) -> None:
        """probe-monitor names one label column, never one SupCon trains on (its AUCs would flatter the model), and
        stays off under per-image DP; probe-monitor-images bounds what a site embeds per evaluation."""
        if not 16 <= self.probe_monitor_images <= 4096:
            raise ValueError("run-config 'probe-monitor-images' must be in [16, 4096]")
        column = self.probe_monitor
        if column != column.strip() or "," in column:
            raise ValueError(f"run-config 'probe-monitor': {column!r} is not one label column name")
        if column and self.dp == "sample":
            raise ValueError("run-config 'probe-monitor' cannot run with dp = \"sample\": its AUCs of the sites' "
                             "labels would leave outside their image-level epsilon accounting")
        if column and column in self.label_field_list:
            from fedrad.common.losses import REGISTRY

            objective = REGISTRY.get(self.objective.lower())
            if objective is not None and objective().needs_labels:
                raise ValueError(f"run-config 'probe-monitor' = {column!r} is one of the label-fields objective "
                                 f"'{self.objective}' trains on: monitor a column the model does not learn from")

    def augment_config(self):
        """The AugmentConfig these keys describe (imports torch: call it where training happens)."""
        from fedrad.common.augment import AugmentConfig

        no_crop = self.aug_crop_min >= 1.0  # the whole image: no aspect jitter either
        return AugmentConfig(crop_scale=(self.aug_crop_min, self.aug_crop_max),
                             crop_ratio=(1.0, 1.0) if no_crop else AugmentConfig.crop_ratio, rotate_deg=self.aug_rotate,
                             hflip=self.hflip, brightness=self.aug_brightness, contrast=self.aug_contrast,
                             gamma=(1 / self.aug_gamma, self.aug_gamma), blur_p=self.aug_blur_p,
                             noise_p=self.aug_noise_p, noise_std=(0.0, self.aug_noise_std))

    def round_lr(self, server_round: int) -> float:
        """The learning rate of `server_round` (1-based) under this run's schedule."""
        from fedrad.common.lr_schedule import round_lr

        return round_lr(self.lr, server_round, self.num_server_rounds, self.lr_schedule, self.warmup_rounds,
                        self.lr_min)

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

    @property
    def label_field_list(self) -> list[str]:
        return [f.strip() for f in self.label_fields.split(",") if f.strip()]
