"""Typed, validated stage configs: YAML in/out, ``key=value`` overrides, one-line errors.

Every stage defines its config as a subclass of :class:`StageConfig` in its own package
(``sd2_ray/<stage>/config.py``); :mod:`sd2_ray.pipeline` composes them. Unknown keys are
errors (a typo must not be silently ignored), and every output gets the resolved config
written next to it (:meth:`StageConfig.save`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sd2_ray.errors import ConfigError

C = TypeVar("C", bound="StageConfig")

CONFIG_FILE = "config.yaml"


class StageConfig(BaseModel):
    """Base for all stage configs: strict (unknown fields rejected) and re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(cls: type[C], path: str | None = None, overrides: dict[str, Any] | None = None,
             section: str | None = None) -> C:
        """Build from an optional YAML file (optionally one top-level ``section`` of it) plus overrides.

        Overrides win over the file; dotted keys (``sampling.temperature``) reach nested fields.
        """
        data: dict[str, Any] = read_yaml(path) if path else {}
        if section is not None:
            data = data.get(section) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return validate(cls, data, source=path)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, out_dir: str, name: str = CONFIG_FILE) -> str:
        """Write the resolved config next to an output (local dir or s3:// prefix)."""
        from sd2_ray import storage

        path = storage.join(out_dir, name)
        storage.write_text(path, self.to_yaml())
        return path


def validate(cls: type[C], data: dict[str, Any], source: str | None = None) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line naming the first bad field: ``config.yaml: field 'prune.sparsity': ...``."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    where = f"{source}: " if source else ""
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}field '{field}': {msg}{more}" if field else f"{where}{msg}{more}"


def read_yaml(path: str) -> dict[str, Any]:
    from sd2_ray import storage

    if not storage.exists(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``lr=1e-4`` -> float, ``a=[1,2]`` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value
