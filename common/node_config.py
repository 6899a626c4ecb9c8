"""The node config: what a site's own `fedrad node` hands its ClientApp (Flower's `--node-config`), typed once.

Every key a site reads is declared here with its type and default, so a handler asks `NodeConfig.of(context
.node_config).data_dir` instead of spelling the string key again. The values are the site's own (never the
coordinator's); Flower hands them over as TOML scalars, `fedrad node` writes them as strings, and an empty
value means "not set". A PACS source's `source-*` keys belong to fedrad.common.sources.pacs.PacsOptions (its
`to_config` / `from_config`), and pass through here untouched.

One schema mechanism with the run config and the site policy (fedrad.common.schema.Schema, pydantic v2): a bad
value is a one-line ConfigError (a ValueError) that names the key. Unlike the run config it lets unknown keys
through (extra = "allow"): a source's own `source-*` keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator

from fedrad.common.schema import Schema


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_ON, _OFF = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _switch(value: Any) -> bool:
    """A boolean node-config value: true/false, or one of the strings in _ON / _OFF (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"must be one of {'/'.join(_ON)} or {'/'.join(_OFF)}")


class NodeConfig(Schema):
    """The node-config keys fedrad reads, by kebab-case name (`data_dir` is `data-dir`)."""

    model_config = ConfigDict(frozen=True, extra="allow", alias_generator=_kebab, populate_by_name=True)
    _where: ClassVar[str] = "node-config"

    data_dir: str = Field("", description="the site's folder, or a PACS URL (fedrad node --data / --source)")
    cache_dir: str = Field("", description="decoded-image cache (default <data>/.fedrad-cache)")
    state_dir: str = Field("", description="what outlives the cache: salt, DP ledger, activity (site_state)")
    audit_dir: str = Field("", description="refusals.jsonl and outgoing.jsonl (default <state>/audit)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int = Field(0, ge=0, description="torch threads per message (0: torch's default)")
    ddp_procs: int = Field(1, ge=1, description="torch.distributed ranks per local round (fedrad node --ddp-procs)")
    inline_decode_max: int | None = Field(None, ge=0, description="a round decodes pending images itself only up "
                                          "to this many (unset: fedrad.common.cache.INLINE_DECODE_MAX)")
    idle_release: bool = Field(True, description="after each message the warm worker lets go of the model, the "
                               "site images' memory maps and freed heap (fedrad.client.app.task.release_idle); off: "
                               "they stay resident between rounds (no rebuild, more idle memory)")
    labels: str = Field("", description="a labels CSV for a PNG/JPEG folder")
    policy: str = Field("", description="the site policy file (empty: the built-in default policy)")
    consortium_key: str = Field("", description="the consortium public key verifying releases")
    max_releases: str = Field("", description="the release store's count quota (release_store.ReleaseQuota)")
    max_release_bytes: str = Field("", description="the release store's size quota (release_store.ReleaseQuota)")

    @field_validator("*", mode="before")
    @classmethod
    def _unset_is_default(cls, value: Any, info) -> Any:
        """An empty or missing value means "not set": the field's default."""
        if value is None or value == "":
            return cls.model_fields[info.field_name].default
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is bool:  # a switch: `fedrad node` writes it as a string
            return _switch(value)
        if isinstance(value, bool):
            raise ValueError("must be a string or a number, not true/false")
        return str(value) if annotation is str else value

    @classmethod
    def of(cls, node_config: Mapping[str, Any], source: str | None = None, text: str = "") -> NodeConfig:
        """The typed view of Flower's node-config mapping (or of a node.toml's, `source` and its `text`); a bad
        value is a one-line ConfigError naming the key (and `source:line`)."""
        return cls.parse(node_config, source, text)

    def to_flower(self) -> dict[str, str]:
        """The set keys as `fedrad node` hands them to the SuperNode (strings; unset keys left out)."""
        fields = type(self).model_fields
        out = {_kebab(k): (str(v).lower() if isinstance(v, bool) else str(v))
               for k, v in self.model_dump().items() if k in fields and v not in ("", None)}
        out.update({k: str(v) for k, v in (self.model_extra or {}).items() if v is not None})
        return out


NODE_CONFIG_KEYS = tuple(_kebab(name) for name in NodeConfig.model_fields)
