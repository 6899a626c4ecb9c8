"""One schema mechanism for every config fedrad reads: the run config (`Recipe`, `RunConfig`), the node config
(`NodeConfig`) and the site policy (`SitePolicy`) are pydantic v2 models on `Schema`.

A `Schema` refuses unknown keys (extra = "forbid"), is frozen (one parsed object is shared by every reader of a
message), and turns every refusal, a wrong type as well as a broken rule, into a `ConfigError`: ONE line that
names the key and, when the values came from a file, `FILE:LINE` (fedrad.common.toml_lines finds the line).
A schema's cross-field rules raise `Rule(message, key)` inside a model validator, so the line is the line of
the key the rule is about.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config value refused: one line (`FILE:LINE: ...` when it came from a file), the key it is about."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.key = key


class Rule(ValueError):
    """Raised by a schema's rules: the message (the config's words) and the field it is about (its line)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_QUOTED = re.compile(r"'([a-z0-9_-]+)'")


class Schema(BaseModel):
    """Base of fedrad's config types: unknown keys refused, frozen, every refusal a one-line ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What the values are, for messages ("run-config", "node-config", "recipe", ...).
    _where: ClassVar[str] = "config"
    # The ConfigError subclass a refusal raises (the site policy's is PolicyError).
    _error: ClassVar[type[ConfigError]] = ConfigError

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise type(self).config_error(exc) from None

    @classmethod
    def file_key(cls, name: str) -> tuple[str | None, str]:
        """(table, key) under which field `name` is written in a file (kebab-case at the top level)."""
        return None, name.replace("_", "-")

    @classmethod
    def field_message(cls, name: str, what: str, value: Any) -> str:
        """The words for a value of field `name` that its type refuses."""
        key = cls.file_key(name)[1] if name in cls.model_fields else name
        return f"{cls._where} '{key}': {what} (got {value!r})"

    @classmethod
    def config_error(cls, exc: ValidationError, source: str | None = None, text: str = "") -> ConfigError:
        """The first error of `exc` as one line: the rule's own words, or `<where> 'k': <what> (got v)`;
        prefixed `source:line` when the values came from a file."""
        err = exc.errors(include_url=False)[0]
        cause = (err.get("ctx") or {}).get("error")
        loc = [str(p) for p in err.get("loc", ())]
        name = loc[0] if loc else None
        if isinstance(cause, Rule | ConfigError):  # ConfigError: our __init__, which model_validate calls
            message, name = str(cause), cause.key or name
        elif cause is not None and not loc:  # a model-wide rule raised as a plain ValueError
            message = str(cause)
        else:
            what = str(cause) if cause is not None else err["msg"][:1].lower() + err["msg"][1:]
            message = cls.field_message(name if name in cls.model_fields else ".".join(loc), what, err.get("input"))
        if name is None or name not in cls.model_fields:  # a rule without its key: the first field it quotes
            quoted = [q.replace("-", "_") for q in _QUOTED.findall(message)]
            name = next((q for q in quoted if q in cls.model_fields), name)
        return cls._located(message, name, source, text)

    @classmethod
    def _located(cls, message: str, name: str | None, source: str | None, text: str) -> ConfigError:
        if source:
            from fedrad.common.toml_lines import at

            table, key = cls.file_key(name) if name in cls.model_fields else (None, name)
            message = f"{at(source, text, key, table)}: {message}"
        return cls._error(message, name)

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str | None = None, text: str = ""):
        """Validate `data` (read from `source`, whose `text` gives the lines); ConfigError on the first refusal."""
        try:
            return cls.model_validate(dict(data))  # pydantic calls __init__ (custom init): ConfigError
        except ValidationError as exc:
            raise cls.config_error(exc, source, text) from None
        except ConfigError as exc:  # pragma: no cover - pydantic wraps what __init__ raises
            raise cls._located(str(exc), exc.key, source, text) from None

    def replace(self, **changes: Any):
        """A copy with `changes`, checked like a new one (pydantic's model_copy would not check them)."""
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


__all__ = ["ConfigError", "Rule", "Schema"]
