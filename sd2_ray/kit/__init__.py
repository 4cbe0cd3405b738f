"""The embedded model kit: a small *trained* target, drafters and prompts built from local text.

``ensure_kit()`` returns a local directory holding ``target/``, ``drafter/`` (same tokenizer,
smaller, poorly aligned), ``drafter-uag/`` (Qwen2 with its own tokenizer), ``prompts/train.jsonl``,
``prompts/eval.jsonl`` and ``kit.json``; it builds the kit (minutes) only when it is missing or
stale, else returns at once. ``with_kit_paths(config)`` replaces a stage config's ``kit:NAME``
paths by those parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sd2_ray.config import StageConfig

C = TypeVar("C", bound="StageConfig")


def ensure_kit(out: str | None = None, **overrides: Any) -> str:
    """Path of an up-to-date kit: ``out``, else ``$SD2_KIT_DIR``, else ``<cache>/kit/<hash>``.

    ``overrides`` are :class:`~sd2_ray.kit.config.KitConfig` fields (e.g. ``target_steps=5``).
    """
    from sd2_ray.kit.build import ensure
    from sd2_ray.kit.config import KitConfig

    if out is not None:
        overrides = {**overrides, "out": str(out)}
    return ensure(KitConfig.load(overrides=overrides))


def kit_paths(kit_dir: str) -> dict[str, str]:
    """The kit's parts by name (target, drafter, drafter-uag, the prompt sets, vlm and its scene prompt
    sets, kit_json)."""
    import os

    return {
        "target": os.path.join(kit_dir, "target"),
        "drafter": os.path.join(kit_dir, "drafter"),
        "drafter-uag": os.path.join(kit_dir, "drafter-uag"),
        "train_prompts": os.path.join(kit_dir, "prompts", "train.jsonl"),
        "eval_prompts": os.path.join(kit_dir, "prompts", "eval.jsonl"),
        "vlm": os.path.join(kit_dir, "vlm"),
        "vision_train_prompts": os.path.join(kit_dir, "prompts", "vision-train.jsonl"),
        "vision_eval_prompts": os.path.join(kit_dir, "prompts", "vision-eval.jsonl"),
        "vision_captions": os.path.join(kit_dir, "prompts", "vision-captions.jsonl"),
        "kit_json": os.path.join(kit_dir, "kit.json"),
    }


def kit_part(name: str, field: str = "path", **overrides: Any) -> str:
    """The local path of a ``kit:NAME`` part (the kit is built or taken from the cache);
    ``field`` names the config field in the one-line error for an unknown part."""
    from sd2_ray.config import KIT_PREFIX
    from sd2_ray.errors import ConfigError

    part = name[len(KIT_PREFIX) :] if name.startswith(KIT_PREFIX) else name
    parts = kit_paths("")
    if part not in parts or part == "kit_json":
        known = ", ".join(KIT_PREFIX + p for p in parts if p != "kit_json")
        raise ConfigError(f"field '{field}': unknown kit part '{name}' (one of {known})")
    return kit_paths(ensure_kit(**overrides))[part]


def with_kit_paths(config: C) -> C:
    """A copy of a stage config with every ``kit:NAME`` path replaced by that part of the (built,
    cached) model kit; the kit is built on first use (minutes), later calls return at once.

    A function of the kit, not a method of StageConfig: the kit is built from a StageConfig of its
    own, so the config layer below must not reach up into it."""
    from sd2_ray.config import KIT_PREFIX, path_fields

    named = {
        f: getattr(config, f) for f in path_fields(type(config)) if str(getattr(config, f) or "").startswith(KIT_PREFIX)
    }
    if not named:
        return config
    overrides = config.kit_overrides()
    return config.model_copy(update={f: kit_part(v, f, **overrides) for f, v in named.items()})


__all__ = ["ensure_kit", "kit_part", "kit_paths", "with_kit_paths"]
