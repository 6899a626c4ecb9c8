"""The site's policy: what this hospital's node agrees to run, whatever the coordinator's run-config says.

The run-config comes from the coordinator, who may be compromised. The policy is a TOML file the hospital
owns (`fedrad node --policy FILE`, written by `fedrad policy init`); the node reads it for every message, and
`policy_mod.site_policy_mod` refuses a run that breaks it before any image is loaded. `check_run` returns the
first rule broken as a `Refusal(rule, detail)`: both stay at the site (log and audit), the coordinator gets
only a fixed error code. Without a file the node uses `DEFAULT_POLICY_TOML` (the file `policy init` writes).

`SitePolicy` is a pydantic model on fedrad.common.schema.Schema, the one mechanism of the run config and the
node config: a wrong type and a broken rule are both one PolicyError line `FILE:LINE: table.key ...`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import field_validator, model_validator

from fedrad.common.data_rules import DEFAULT_MODALITIES, DataRules
from fedrad.common.run_config import DP_MODES, RunConfig
from fedrad.common.schema import ConfigError, Rule, Schema

HEADER_LABEL_FIELDS = ("view", "body_part", "sex", "age", "modality", "plane", "contrast")  # from DICOM headers
# The default policy's models: those fedrad knows to work (common.models.KNOWN_MODELS, kept equal by a test).
# Not imported from there because that module imports torch, and this policy is read for every message,
# SecAgg+'s key-exchange stages included, which otherwise never load torch.
DEFAULT_MODELS = ("test_resnet", "resnet10t", "resnet18", "resnet50", "vit_tiny_patch16_224", "vit_small_patch16_224")
# A plain timm architecture name (optionally with timm's ".tag"). Hub and path references such as
# "hf-hub:org/name", "timm/name", "local-dir:/x" all hold ':' or '/' and make timm fetch or read files.
_TIMM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PolicyError(ConfigError):
    """The policy file is unreadable or breaks its own rules; the message starts with `FILE:LINE:`."""


@dataclass(frozen=True)
class Refusal:
    """Why this site will not handle a message: the policy rule (its key) and a detail for the site's staff.
    Neither is ever sent to the coordinator."""

    rule: str
    detail: str


# table -> keys it may hold
_LAYOUT: dict[str, tuple[str, ...]] = {
    "coordinator": ("ca_sha256",),
    "training": ("objectives", "models", "max_image_size", "max_batch_size", "max_local_steps",
                 "max_rounds_per_day", "max_evaluations_per_day", "label_fields"),
    "privacy": ("require_secagg", "dp_modes", "min_dp_noise", "dp_delta", "epsilon_budget"),
    "data": ("max_megapixels", "modalities", "allow_burned_in", "max_series_share", "min_slice_spacing_mm"),
}
_TABLE_OF = {key: table for table, keys in _LAYOUT.items() for key in keys}
# What a key of each type must be (the words of a refusal).
_MUST = {bool: "true or false", int: "a whole number >= 0", float: "a finite number >= 0", str: "a string"}


class SitePolicy(Schema):
    """The parsed policy; field names are the TOML keys (tables: coordinator, training, privacy, data)."""

    _where: ClassVar[str] = "policy"
    _error: ClassVar[type[ConfigError]] = PolicyError

    ca_sha256: str = ""
    objectives: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    max_image_size: int = 0
    max_batch_size: int = 0
    max_local_steps: int = 0
    max_rounds_per_day: int = 0
    max_evaluations_per_day: int = 0
    label_fields: tuple[str, ...] = ()
    require_secagg: bool = False
    dp_modes: tuple[str, ...] = ()
    min_dp_noise: float = 0.0
    dp_delta: float = 0.0
    epsilon_budget: float = 0.0
    max_megapixels: int = 0
    # cross-sectional data rules (issue 27): see common/data_rules.py
    modalities: tuple[str, ...] = ()
    allow_burned_in: bool = False
    max_series_share: float = 0.0
    min_slice_spacing_mm: float = 0.0
    source: str = "built-in default"

    @property
    def max_pixels(self) -> int:
        """The pixel budget a file's header may declare before it is skipped as too-large, undecoded."""
        return self.max_megapixels << 20

    @property
    def data_rules(self) -> DataRules:
        """Which decoded images this site uses and how a round samples series (scan, loader, trainer)."""
        return DataRules(tuple(m.upper() for m in self.modalities), self.allow_burned_in, self.max_series_share,
                         self.min_slice_spacing_mm)

    @classmethod
    def file_key(cls, name: str) -> tuple[str | None, str]:
        return _TABLE_OF.get(name), name

    @classmethod
    def field_message(cls, name: str, what: str, value: Any) -> str:
        return f"{_TABLE_OF.get(name, '?')}.{name} {what}"

    @field_validator("*", mode="before")
    @classmethod
    def _typed(cls, value: Any, info) -> Any:
        """TOML values of the declared kind only (no "yes" for true, no negative counts)."""
        kind = cls.model_fields[info.field_name].annotation
        must = _MUST.get(kind, "a list of non-empty strings")
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = not isinstance(value, bool) and isinstance(value, int) and value >= 0
        elif kind is float:
            ok = not isinstance(value, bool) and isinstance(value, int | float) and value >= 0 and value != float("inf")
            value = float(value) if ok else value
        elif kind is str:
            ok = isinstance(value, str)
        else:  # a tuple of strings
            ok = isinstance(value, list | tuple) and all(isinstance(v, str) and v.strip() for v in value)
            value = tuple(v.strip() for v in value) if ok else value
        if not ok:
            raise ValueError(f"must be {must}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _rules(self):
        _validate(self)
        return self


def _default_text() -> str:
    from fedrad.common.losses import OBJECTIVES

    def toml_list(items) -> str:
        return "[" + ", ".join(f'"{x}"' for x in items) + "]"

    return f"""\
# fedrad site policy: what this hospital's node agrees to run. The node reads this file for every message
# from the coordinator; the coordinator can neither see nor change it. A run that breaks a rule is refused
# before any image is loaded: the rule is written to this site's audit folder (refusals.jsonl) and the
# coordinator receives only a fixed error code. Check an edited copy with `fedrad policy check FILE` and use
# it with `fedrad node --policy FILE`. A key left out takes the value shown here.

[coordinator]
# SHA-256 fingerprint of the consortium CA certificate this node may talk to, e.g. from
# `openssl x509 -in ca.pem -noout -fingerprint -sha256` (colons optional). When set, `fedrad node` refuses
# to start unless --certs holds exactly this CA. Empty: any CA given with --certs.
ca_sha256 = ""

[training]
# Pretraining objectives this site runs.
objectives = {toml_list(OBJECTIVES)}
# Models: plain timm architecture names only. Hub or path references (hf-hub:..., timm/..., local-dir:...,
# anything with '/' or ':') are never accepted: they would make this node download or read code and weights.
models = {toml_list(DEFAULT_MODELS)}
max_image_size = 512       # pixels per side
max_batch_size = 128       # images per step
max_local_steps = 1000     # steps per round
max_rounds_per_day = 500   # training rounds accepted in any 24 hours, all runs together (0: no limit)
# Evaluations accepted in any 24 hours, all runs together (0: no limit): evaluate messages, and train messages
# of runs with eval-in-train (they also measure the held-out images). Each one returns held-out loss,
# alignment and uniformity of weights the coordinator chose, so each one is a query of this site's images.
max_evaluations_per_day = 500
# Label fields a run may train on (SupCon). The default is the fields derived from DICOM headers. A column of
# your labels CSV (e.g. "finding") is used only if you add it here: the coordinator cannot pick one.
label_fields = {toml_list(HEADER_LABEL_FIELDS)}

[privacy]
require_secagg = false     # true: refuse runs without SecAgg+ (the coordinator then sees only the sum)
# DP modes accepted: "none", "client" (site-level; the coordinator adds the noise, so it is the coordinator's
# promise), "sample" (DP-SGD here, accounted here). Remove "none" to require DP.
dp_modes = {toml_list(DP_MODES)}
min_dp_noise = 0.0         # lowest noise multiplier accepted when dp is "client" or "sample"
dp_delta = 1e-05           # loosest dp-delta accepted; also the delta of this site's own epsilon
# This site's image-level epsilon budget for dp = "sample" across ALL runs: the ledger in the node's state
# folder adds up every run's steps, so a new run does not start again from 0. 0: no site-wide limit
# (a run's own dp-epsilon-budget is still applied to the site's total).
epsilon_budget = 20.0

[data]
# Largest image a DICOM header may declare (rows x columns x frames x samples, in 2^20 pixels) before the file
# is skipped as too-large without being decoded: a few-KB compressed file can declare gigapixels.
max_megapixels = 64
# Modalities used for training (an empty list: any). NM and PT are read and listed by `fedrad scan` but used
# only when named here. Images without a Modality tag are used only when the list is empty.
modalities = {toml_list(DEFAULT_MODALITIES)}
allow_burned_in = false    # true: also use images whose BurnedInAnnotation is YES (text may identify a patient)
max_series_share = 0.1     # largest share of a local round's images one CT/MR series may be (0: no cap)
min_slice_spacing_mm = 0.0 # keep slices of one series at least this far apart (0: every slice)
"""


def default_policy_text() -> str:
    """The commented default policy file (`fedrad policy init` writes exactly this)."""
    return _default_text()


def _fail(source: str, text: str, table: str | None, key: str | None, message: str) -> PolicyError:
    from fedrad.common.toml_lines import at

    return PolicyError(f"{at(source, text, key, table)}: {message}")


def _plain_model_name(name: str) -> bool:
    return bool(_TIMM_NAME.match(name))


def _norm_fingerprint(value: str) -> str:
    return value.replace(":", "").replace(" ", "").strip().lower()


@functools.lru_cache(maxsize=16)
def parse_policy(text: str, source: str = "<policy>") -> SitePolicy:
    """Parse and validate policy TOML; missing keys take the default. PolicyError names FILE:LINE and key.

    Cached on the text: the file is re-read for every message (an edit applies to the next one), but the
    same text is parsed once per process however many checks of a message ask for the policy."""
    return _parse(text, source, default_policy())


def _parse(text: str, source: str, base: SitePolicy | None) -> SitePolicy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))
        raise PolicyError(f"{source}:{line}: not valid TOML: {re.sub(r' [(]at .*[)]$', '', msg)}") from None
    values: dict[str, Any] = {}
    for table, body in data.items():
        if table not in _LAYOUT:
            raise _fail(source, text, table, None, f"unknown table [{table}] (known: {', '.join(_LAYOUT)})")
        if not isinstance(body, dict):
            raise _fail(source, text, None, table, f"'{table}' must be a table [{table}]")
        for key, value in body.items():
            if key not in _LAYOUT[table]:
                raise _fail(source, text, table, key,
                            f"unknown key {table}.{key} (known: {', '.join(_LAYOUT[table])})")
            values[key] = value
    merged = {name: getattr(base, name) for name in SitePolicy.model_fields} if base else {}
    merged.update(values)
    merged["source"] = source
    return SitePolicy.parse(merged, source, text)


def _validate(p: SitePolicy) -> None:
    """The policy's own rules (a Rule names the key, so the error names its line)."""
    from fedrad.common.losses import OBJECTIVES

    def fail(table: str, key: str, message: str) -> Rule:
        return Rule(message, key)

    if p.ca_sha256 and not _HEX64.match(_norm_fingerprint(p.ca_sha256)):
        raise fail("coordinator", "ca_sha256", "coordinator.ca_sha256 must be a SHA-256 fingerprint "
                   "(64 hex digits, colons allowed) or empty")
    if not p.objectives:
        raise fail("training", "objectives", "training.objectives is empty: every run would be refused")
    for name in p.objectives:
        if name not in OBJECTIVES:
            raise fail("training", "objectives", f"unknown objective '{name}' (choose from {', '.join(OBJECTIVES)})")
    if not p.models:
        raise fail("training", "models", "training.models is empty: every run would be refused")
    for name in p.models:
        if not _plain_model_name(name):
            raise fail("training", "models", f"model '{name}' is not a plain timm name: hub or path references "
                       "(hf-hub:, timm/, local-dir:, anything with '/' or ':') are never allowed")
    for key in ("max_image_size", "max_batch_size", "max_local_steps"):
        if getattr(p, key) < 1:
            raise fail("training", key, f"training.{key} must be at least 1")
    for name in p.label_fields:
        if "," in name:
            raise fail("training", "label_fields", f"label field '{name}' may not contain a comma")
    if not p.dp_modes:
        raise fail("privacy", "dp_modes", "privacy.dp_modes is empty: every run would be refused")
    for mode in p.dp_modes:
        if mode not in DP_MODES:
            raise fail("privacy", "dp_modes", f"unknown dp mode '{mode}' (choose from {', '.join(DP_MODES)})")
    if p.max_series_share > 1:
        raise fail("data", "max_series_share", "data.max_series_share is a share: between 0 and 1")
    if p.max_megapixels < 1:
        raise fail("data", "max_megapixels", "data.max_megapixels must be at least 1")
    if not 0 < p.dp_delta < 1:
        raise fail("privacy", "dp_delta", "privacy.dp_delta must be between 0 and 1 (e.g. 1e-5)")


@functools.cache
def default_policy() -> SitePolicy:
    """The policy a node uses without `--policy` (parsed from the very text `fedrad policy init` writes)."""
    return _parse(_default_text(), "built-in default", None)


def load_policy(path: str | os.PathLike[str]) -> SitePolicy:
    """Read and validate a policy file; PolicyError (a ValueError) names the file, line and key."""
    return parse_policy(_read_policy(path), str(path))


def _read_policy(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: policy file unreadable ({exc})") from None


def policy_for(node_config: dict[str, Any]) -> SitePolicy:
    """The node's policy: node-config `policy` (a file that must load; never silently the default) or the
    built-in default when no policy is configured."""
    from fedrad.common.node_config import NodeConfig

    path = NodeConfig.of(node_config).policy
    if not path:
        return default_policy()  # parsed once per process (functools.cache)
    return _parsed_policy(_read_policy(path), path)


@functools.lru_cache(maxsize=4)
def _parsed_policy(text: str, source: str) -> SitePolicy:
    """A policy text parsed once: the mod, the data loader, the DP budget and the monitor of a message (and a
    warm worker's later messages) share it; an edited file is a new text, parsed again."""
    return parse_policy(text, source)


def check_run(policy: SitePolicy, cfg: RunConfig) -> Refusal | None:
    """The first policy rule `cfg` breaks, or None. Checked before any data is read or model is built."""
    if not _plain_model_name(cfg.model):
        return Refusal("models", f"model {cfg.model!r} is a hub or path reference, never allowed")
    if cfg.model not in policy.models:
        return Refusal("models", f"model {cfg.model!r} is not in this site's models")
    if cfg.objective not in policy.objectives:
        return Refusal("objectives", f"objective {cfg.objective!r} is not in this site's objectives")
    for key, asked, limit in (("max_image_size", cfg.image_size, policy.max_image_size),
                              ("max_batch_size", cfg.batch_size, policy.max_batch_size),
                              ("max_local_steps", cfg.local_steps, policy.max_local_steps)):
        if asked > limit:
            return Refusal(key, f"run asks for {asked}, this site allows at most {limit}")
    from fedrad.common.losses import get_objective

    if get_objective(cfg.objective).needs_labels:  # only SupCon trains on label fields
        for name in cfg.label_field_list:
            if name not in policy.label_fields:
                return Refusal("label_fields", f"label field {name!r} is not in this site's label_fields")
    if policy.require_secagg and not cfg.secagg:
        return Refusal("require_secagg", "run has secagg = false; this site requires SecAgg+")
    if cfg.dp not in policy.dp_modes:
        return Refusal("dp_modes", f"run has dp = {cfg.dp!r}; this site accepts {list(policy.dp_modes)}")
    if cfg.dp != "none":
        if cfg.dp_noise < policy.min_dp_noise:
            return Refusal("min_dp_noise", f"run has dp-noise {cfg.dp_noise:g} < this site's {policy.min_dp_noise:g}")
        if cfg.dp_delta > policy.dp_delta:
            return Refusal("dp_delta", f"run has dp-delta {cfg.dp_delta:g} > this site's {policy.dp_delta:g}")
    return None


def epsilon_limit(policy: SitePolicy, cfg: RunConfig) -> float:
    """The stricter of the site's and the run's ε budgets (0: neither sets one); applied to the site's ε
    across all runs."""
    budgets = [b for b in (policy.epsilon_budget, cfg.dp_epsilon_budget) if b > 0]
    return min(budgets) if budgets else 0.0


def ca_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a PEM certificate's DER bytes (hex, lower case): what `openssl x509 -fingerprint -sha256`
    prints, without colons."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    path = Path(path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PolicyError(f"{path}: CA certificate unreadable ({exc.strerror})") from None
    except ValueError:
        raise PolicyError(f"{path}: not a PEM certificate") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def check_coordinator_ca(policy: SitePolicy, ca_cert: str | os.PathLike[str] | None) -> None:
    """At node start: with `ca_sha256` set, the CA the node is given must be exactly that one."""
    if not policy.ca_sha256:
        return
    if ca_cert is None:
        raise PolicyError(f"{policy.source}: coordinator.ca_sha256 is set, so this node talks only to that "
                          "consortium CA: start it with --certs")
    found = ca_fingerprint(ca_cert)
    if found != _norm_fingerprint(policy.ca_sha256):
        raise PolicyError(f"{ca_cert}: CA fingerprint {found} is not the one this site's policy "
                          f"({policy.source}) allows; refusing to join")


def check_models_known(policy: SitePolicy, text: str, source: str) -> None:
    """`fedrad policy check`: every listed model is an architecture this timm knows (imports timm)."""
    import timm

    for name in policy.models:
        if not timm.is_model(name.split(".")[0]):
            raise _fail(source, text, "training", "models", f"model '{name}' is not a timm architecture")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a policy file (logged at node start so the audit says which policy was in force)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


DEFAULT_POLICY_FILE = "fedrad-site-policy.toml"


__all__ = ["DEFAULT_MODELS", "DP_MODES", "HEADER_LABEL_FIELDS", "PolicyError", "Refusal", "SitePolicy",
           "ca_fingerprint", "check_coordinator_ca", "check_models_known", "check_run",
           "default_policy", "default_policy_text", "epsilon_limit", "load_policy",
           "parse_policy", "policy_for"]
