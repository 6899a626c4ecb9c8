"""Typed view of the Flower run-config (pyproject `[tool.flwr.app.config]`), shared by both apps.

Flower hands run-config over as a flat dict of TOML scalars; both the ServerApp and the ClientApp read
it through `RunConfig.from_flower` so a misspelt or mistyped key fails loudly, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 900.0
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
    # Strategy knobs (used by the strategies that take them).
    server_lr: float = 1.0
    server_momentum: float = 0.9
    proximal_mu: float = 0.01
    trimmed_beta: float = 0.2
    krum_byzantine: int = 0
    # Update screening before aggregation: an update whose distance to the global model is more than
    # this many times the round's median distance is rejected (0 disables).
    norm_outlier_factor: float = 10.0
    # Run directory (checkpoints, metrics.jsonl, plots); empty: runs/<timestamp> under the cwd.
    run_dir: str = ""
    resume: bool = False
    # Privacy (see docs/PRIVACY.md).
    secagg: bool = False
    secagg_shares: int = 3
    secagg_threshold: int = 2
    dp: str = "none"
    dp_clip: float = 10.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_epsilon_budget: float = 0.0
    # The consortium's signature over the FAB and this config (fedrad.common.run_signature); set by
    # `fedrad run --sign-key`, checked by each site's runtime before its data is touched.
    run_signature: str = ""

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

    @property
    def model_norm(self) -> str:
        """GroupNorm when sites train with per-image DP-SGD (BatchNorm mixes the images of a batch)."""
        return "group" if self.dp == "sample" else "batch"

    @property
    def label_field_list(self) -> list[str]:
        return [f.strip() for f in self.label_fields.split(",") if f.strip()]
