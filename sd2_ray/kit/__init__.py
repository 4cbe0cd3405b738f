"""The embedded model kit: a small *trained* target, drafters and prompts built from local text.

``ensure_kit()`` returns a local directory holding ``target/``, ``drafter/`` (same tokenizer,
smaller, poorly aligned), ``drafter-uag/`` (Qwen2 with its own tokenizer), ``prompts/train.jsonl``,
``prompts/eval.jsonl`` and ``kit.json``; it builds the kit (minutes) only when it is missing or
stale, else returns at once.
"""

from __future__ import annotations

from typing import Any


def ensure_kit(out: str | None = None, **overrides: Any) -> str:
    """Path of an up-to-date kit: ``out``, else ``$SD2_KIT_DIR``, else ``<cache>/kit/<hash>``.

    ``overrides`` are :class:`~sd2_ray.kit.config.KitConfig` fields (e.g. ``target_steps=5``).
    """
    from sd2_ray.kit.cache import ensure
    from sd2_ray.kit.config import KitConfig

    if out is not None:
        overrides = {**overrides, "out": str(out)}
    return ensure(KitConfig.load(overrides=overrides))


def kit_paths(kit_dir: str) -> dict[str, str]:
    """The kit's parts by name (target, drafter, drafter-uag, train_prompts, eval_prompts, kit_json)."""
    import os

    return {
        "target": os.path.join(kit_dir, "target"),
        "drafter": os.path.join(kit_dir, "drafter"),
        "drafter-uag": os.path.join(kit_dir, "drafter-uag"),
        "train_prompts": os.path.join(kit_dir, "prompts", "train.jsonl"),
        "eval_prompts": os.path.join(kit_dir, "prompts", "eval.jsonl"),
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


__all__ = ["ensure_kit", "kit_part", "kit_paths"]
