"""Typed, validated stage configs: YAML in/out, ``key=value`` overrides, one-line errors.

Every stage defines its config as a subclass of :class:`StageConfig` in its own package
(``sd2_ray/<stage>/config.py``); :mod:`sd2_ray.pipeline` composes them. Unknown keys are
errors (a typo must not be silently ignored), and every output gets the resolved config
written next to it (:meth:`StageConfig.save`).
"""

from __future__ import annotations

import json
import os
import types
import typing
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from sd2_ray.errors import ConfigError

C = TypeVar("C", bound="StageConfig")

CONFIG_FILE = "config.yaml"
KIT_PREFIX = "kit:"
OVERRIDES_ENV = "SD2_OVERRIDES"


def resolve_path(value: Any) -> str:
    """A user's path as every process will read it: a local path made absolute against the
    caller's working directory (Ray Train, Tune and Serve run code in other directories, so a
    relative path would name another place there); ``s3://`` URIs and ``kit:`` names are kept
    (the latter are resolved by :func:`sd2_ray.kit.with_kit_paths`)."""
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    if text.startswith(("s3://", KIT_PREFIX)):
        return text
    if "://" in text:
        raise ValueError(f"'{text}': only local paths and s3:// URIs are supported")
    return os.path.abspath(os.path.expanduser(text))


class _PathMark:
    """Marks a field as a storage path (see :func:`path_fields`)."""


PATH_MARK = _PathMark()
# The type of every path field in every stage config: local (made absolute), s3:// or kit:.
StoragePath = Annotated[str, AfterValidator(resolve_path), PATH_MARK]


# Custom resources (the cluster file's node-type markers, e.g. ``gen_node``) a stage's tasks,
# actors and workers ask for, so they land on the node type meant for them. A small fraction
# of the marker: a node declaring ``gen_node: 1`` still takes a thousand of them.
NODE_RESOURCES_DESCRIPTION = (
    "custom resources each of this stage's Ray tasks, actors and workers asks for, "
    "placing them on the node type that declares them (e.g. {gen_node: 0.001}); "
    "`sd2 run` fills it from the cluster file's node types when `cluster` is set"
)


def node_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"'{name}' is not a custom resource (use the stage's CPU/GPU fields)")
        if amount <= 0:
            raise ValueError(f"'{name}': amount must be > 0, got {amount}")
    return value


NodeResources = Annotated[dict[str, float], AfterValidator(node_resources)]


def _is_path(annotation: Any, metadata: list[Any]) -> bool:
    if any(m is PATH_MARK for m in metadata):
        return True
    if typing.get_origin(annotation) is Annotated:
        return any(m is PATH_MARK for m in typing.get_args(annotation)[1:])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_path(arg, []) for arg in typing.get_args(annotation))
    return False


def path_fields(cls: type[BaseModel]) -> list[str]:
    """The names of a config class's :data:`StoragePath` fields (optional ones included)."""
    return [name for name, field in cls.model_fields.items() if _is_path(field.annotation, field.metadata)]


class StageConfig(BaseModel):
    """Base for all stage configs: strict (unknown fields rejected) and re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(
        cls: type[C], path: str | None = None, overrides: dict[str, Any] | None = None, section: str | None = None
    ) -> C:
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

    def kit_overrides(self) -> dict[str, Any]:
        """KitConfig fields used to resolve ``kit:`` names (a pipeline config carries some); read by
        :func:`sd2_ray.kit.with_kit_paths`, which lives in the kit because the kit's own config is
        a StageConfig: this module stays below the kit and never imports it."""
        return {}

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


def format_validation_error(err: ValidationError, source: str | None = None, prefix: str = "") -> str:
    """One line naming the first bad field: ``config.yaml: field 'prune.sparsity': ...``
    (``prefix``: the section the validated data came from). An unknown field is named first: a
    typo in a field's name is also why that field then counts as missing."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = ".".join([p for p in [prefix] if p] + [str(p) for p in first["loc"]])
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


def env_overrides() -> list[str]:
    """``key=value`` overrides from ``$SD2_OVERRIDES`` (space-separated): a smaller budget for a
    smoke run of an unchanged command line, e.g. in CI. The command line's own overrides win."""
    import shlex

    return shlex.split(os.environ.get(OVERRIDES_ENV, ""))


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
