"""The training recipe: every switch that decides what a model learns, with its one default and its range check.

A federated run (`RunConfig`, which inherits this), the centralised baseline `fedrad pretrain` (its options are
generated from these fields) and the benchmarks' in-process runs all read the same `Recipe`, so the baseline a
federation is compared with trains the same recipe unless told otherwise. pyproject's `[tool.flwr.app.config]`
declares the same keys and values (tests/test_recipe_defaults.py checks them field by field).

A pydantic model on fedrad.common.schema.Schema (the one mechanism of run config, node config and site policy):
each field's `description` is its one-line help (the `fedrad pretrain` option help); a refusal is one
ConfigError line naming the key. Reading a recipe never imports torch: `augment_config` does, where training
happens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, model_validator

from fedrad.common.schema import Rule, Schema

# The model's normalisation layers by name (fedrad.common.norms.NORMS; repeated here so that reading a recipe
# never imports torch; tests/test_norm_policy.py checks the two agree).
NORM_NAMES = ("batch", "group")
# timm's optimizers the trainer builds (fedrad.client.training.trainer.OPTIMIZERS; tests/test_recipe_defaults.py
# checks).
OPTIMIZER_NAMES = ("adamw", "sgd", "lars")


def _f(default: Any, help: str, choices: str | None = None) -> Any:  # noqa: A002 - argparse's word
    """A recipe field: its default, its help line and, for a name, where the allowed names come from."""
    return Field(default, description=help, json_schema_extra={"choices": choices} if choices else None)


class Recipe(Schema):
    """What a model learns and how: architecture, objective, optimiser, schedule, augmentations."""

    # Error messages say where the values came from ("run-config" in RunConfig).
    _where: ClassVar[str] = "recipe"

    model: str = _f("resnet18", "timm architecture (1 input channel)")
    objective: str = _f("supcon", "self-supervised objective (fedrad.common.losses)", "objectives")
    image_size: int = _f(64, "square input size in pixels")
    proj_dim: int = _f(128, "projection head output size")
    batch_size: int = _f(32, "images per step")
    lr: float = _f(3e-4, "learning rate (the peak of the schedule)")
    optimizer: str = _f("adamw", "timm optimizer (lars for large batches)", "optimizers")
    weight_decay: float = _f(1e-4, "weight decay (not on biases and norm parameters)")
    temperature: float = _f(0.1, "contrastive temperature")
    label_fields: str = _f("view,body_part,sex,age", "header fields whose combination is the SupCon label")
    hflip: bool = _f(False, "random horizontal flips (off: laterality matters in radiographs)")
    seed: int = _f(0, "random seed")
    # Normalisation layers of the model (fedrad.common.norms): "batch" (BatchNorm; FedAvg averages its running
    # statistics too) or "group" (GroupNorm: no batch or site statistics at all). dp = "sample" forces "group".
    # Chosen by measurement on label-skewed sites: README "Recipe switches", RESULTS.md "norm policy".
    norm: str = _f("batch", "normalisation layers: batch (BatchNorm) or group (GroupNorm, as runs with "
                   "dp = \"sample\" train; recorded in the weights file)", "norms")
    # The first model (fedrad.common.init_weights): a local timm checkpoint file (e.g. ImageNet weights) or an
    # earlier release bundle folder; init-pubkey verifies a bundle. Empty: random.
    init: str = _f("", "start from a local timm checkpoint (.safetensors/.pth, e.g. ImageNet weights; RGB first "
                   "conv summed to 1 channel) or an earlier release bundle folder (verified with --init-pubkey); "
                   "never downloads (default: random init)")
    init_pubkey: str = _f("", "consortium public key verifying an --init bundle (default: none)")
    # The learning rate per round (fedrad.common.lr_schedule, timm's CosineLRScheduler over rounds): "constant"
    # or "cosine" from `lr` down to `lr-min`, after `warmup-rounds` of linear warm-up from lr-min.
    lr_schedule: str = _f("constant", "learning rate per round: constant or cosine (timm's scheduler)",
                          "lr_schedules")
    warmup_rounds: int = _f(0, "rounds of linear warm-up from lr-min to lr")
    lr_min: float = _f(0.0, "the schedule's floor")
    # Augmentations of the contrastive views (fedrad.common.augment, README "Recipe switches"): crop area range,
    # rotation (degrees), brightness shift, contrast factor, gamma in [1/g, g], blur and noise probabilities, the
    # largest noise std. 0 (1 for crop-min/gamma) switches a piece off. hflip stays off: laterality matters.
    aug_crop_min: float = _f(0.4, "smallest random-crop area fraction (1: no crop)")
    aug_crop_max: float = _f(1.0, "largest random-crop area fraction")
    aug_rotate: float = _f(10.0, "largest rotation in degrees (0: off)")
    aug_brightness: float = _f(0.1, "largest brightness shift (0: off)")
    aug_contrast: float = _f(0.2, "largest contrast change (0: off)")
    aug_gamma: float = _f(1.25, "gamma drawn in [1/g, g] (1: off)")
    aug_blur_p: float = _f(0.5, "probability of a Gaussian blur")
    aug_noise_p: float = _f(0.5, "probability of Gaussian noise")
    aug_noise_std: float = _f(0.03, "largest noise standard deviation")

    @classmethod
    def recipe_fields(cls) -> tuple[str, ...]:
        """The recipe's own field names (a subclass's extra fields excluded), in declaration order."""
        return tuple(Recipe.model_fields)

    @classmethod
    def field_help(cls, name: str) -> tuple[Any, str, str | None]:
        """(default, help line, where its allowed names come from) of field `name`."""
        info = cls.model_fields[name]
        return info.default, info.description or "", (info.json_schema_extra or {}).get("choices")

    @classmethod
    def from_attrs(cls, obj: Any) -> Recipe:
        """The Recipe of an object carrying one attribute per recipe field (`fedrad pretrain`'s parsed options);
        the range checks run, so a bad value is a ConfigError naming the key."""
        return Recipe(**{name: getattr(obj, name) for name in cls.recipe_fields()})

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], source: str | None = None, text: str = ""):
        """Build from a flat kebab-case dict of TOML scalars (Flower's run config, a file's table); unknown keys
        and unreadable values are a ConfigError that names them (and `source:line` when `source` is given)."""
        from fedrad.common.schema import ConfigError

        known = cls.model_fields
        values: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                unknown.append(key)
                continue
            kind = known[name].annotation
            try:
                if kind is bool:
                    values[name] = value if isinstance(value, bool) else str(value).lower() == "true"
                elif kind is int:
                    values[name] = int(value)
                elif kind is float:
                    values[name] = float(value)
                else:
                    values[name] = str(value)
            except (TypeError, ValueError):
                message = f"{cls._where} key '{key}': cannot read {value!r} as {getattr(kind, '__name__', kind)}"
                if source:
                    from fedrad.common.toml_lines import at

                    message = f"{at(source, text, key)}: {message}"
                raise ConfigError(message, name) from None
        if unknown:
            raise ConfigError(f"unknown {cls._where} keys: {', '.join(sorted(unknown))}")
        return cls.parse(values, source, text)

    @model_validator(mode="after")
    def _rules(self):
        self._check()
        return self

    def _check(self) -> None:
        """Every rule of this config (RunConfig adds the federation's)."""
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Each recipe key refused by name when out of range (the same rule wherever the recipe is built)."""
        from fedrad.common.lr_schedule import LR_SCHEDULES

        w = self._where
        if self.image_size < 16 or self.batch_size < 2 or self.proj_dim < 1:
            raise Rule(f"{w} 'image-size' must be >= 16, 'batch-size' >= 2 and 'proj-dim' >= 1", 'image_size')
        if not self.lr >= 0 or self.weight_decay < 0 or not self.temperature > 0:  # lr 0: weights stay as loaded
            raise Rule(f"{w} 'lr' and 'weight-decay' must be >= 0 and 'temperature' > 0", 'lr')
        if self.optimizer.lower() not in OPTIMIZER_NAMES:
            raise Rule(f"{w} 'optimizer': unknown '{self.optimizer}', choose one of "
                       f"{', '.join(OPTIMIZER_NAMES)}", 'optimizer')
        if self.lr_schedule not in LR_SCHEDULES:
            raise Rule(f"{w} 'lr-schedule': unknown '{self.lr_schedule}', choose one of "
                       f"{', '.join(LR_SCHEDULES)}", 'lr_schedule')
        if self.warmup_rounds < 0:
            raise Rule(f"{w} 'warmup-rounds' must be >= 0", 'warmup_rounds')
        if not 0 <= self.lr_min <= self.lr:
            raise Rule(f"{w} 'lr-min' must be in [0, lr]", 'lr_min')
        if not 0 < self.aug_crop_min <= self.aug_crop_max <= 1:
            raise Rule(f"{w} 'aug-crop-min' and 'aug-crop-max' must satisfy 0 < min <= max <= 1", 'aug_crop_min')
        if self.norm not in NORM_NAMES:
            raise Rule(f"{w} 'norm': unknown '{self.norm}', choose one of {', '.join(NORM_NAMES)}", 'norm')
        if not 0 <= self.aug_rotate <= 180:
            raise Rule(f"{w} 'aug-rotate' must be in [0, 180] degrees", 'aug_rotate')
        if not (0 <= self.aug_brightness < 1 and 0 <= self.aug_contrast < 1):
            raise Rule(f"{w} 'aug-brightness' and 'aug-contrast' must be in [0, 1)", 'aug_brightness')
        if self.aug_gamma < 1:
            raise Rule(f"{w} 'aug-gamma' must be >= 1 (gamma is drawn in [1/g, g]; 1 switches it off)", 'aug_gamma')
        if not (0 <= self.aug_blur_p <= 1 and 0 <= self.aug_noise_p <= 1):
            raise Rule(f"{w} 'aug-blur-p' and 'aug-noise-p' must be probabilities in [0, 1]", 'aug_blur_p')
        if self.aug_noise_std < 0:
            raise Rule(f"{w} 'aug-noise-std' must be >= 0", 'aug_noise_std')

    def augment_config(self):
        """The AugmentConfig these keys describe (imports torch: call it where training happens)."""
        from fedrad.common.augment import AugmentConfig

        no_crop = self.aug_crop_min >= 1.0  # the whole image: no aspect jitter either
        return AugmentConfig(crop_scale=(self.aug_crop_min, self.aug_crop_max),
                             crop_ratio=(1.0, 1.0) if no_crop else AugmentConfig.crop_ratio, rotate_deg=self.aug_rotate,
                             hflip=self.hflip, brightness=self.aug_brightness, contrast=self.aug_contrast,
                             gamma=(1 / self.aug_gamma, self.aug_gamma), blur_p=self.aug_blur_p,
                             noise_p=self.aug_noise_p, noise_std=(0.0, self.aug_noise_std))

    def recipe_lr(self, round_: int, total_rounds: int) -> float:
        """The learning rate of round `round_` (1-based) of `total_rounds` under this recipe's schedule."""
        from fedrad.common.lr_schedule import round_lr

        return round_lr(self.lr, round_, total_rounds, self.lr_schedule, self.warmup_rounds, self.lr_min)

    @property
    def label_field_list(self) -> list[str]:
        return [f.strip() for f in self.label_fields.split(",") if f.strip()]

    def recipe_dict(self) -> dict[str, Any]:
        """The recipe's values by kebab-case key (what a weights file's metadata records)."""
        return {name.replace("_", "-"): getattr(self, name) for name in self.recipe_fields()}


RECIPE_DEFAULTS = Recipe()
