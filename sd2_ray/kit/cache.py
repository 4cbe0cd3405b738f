"""Where the kit lives and whether it is current: content hash, cache location, build lock.

Kept free of torch/transformers imports so a cached ``ensure_kit()`` returns in milliseconds.
Building (and :func:`sd2_ray.kit.build.ensure`, which builds when the kit is not current) sits
above this module in :mod:`sd2_ray.kit.build`: the cache answers questions and builds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator

from sd2_ray import manifest, storage
from sd2_ray.kit.config import KitConfig
from sd2_ray.kit.corpus import stdlib_listing

log = logging.getLogger(__name__)

# Bump when the build changes in a way the config and shapes don't show (data format, recipe).
KIT_VERSION = 3  # 3: six tasks (categories), the drafter pretrains on them too
KIT_JSON = "kit.json"
STAGE = "kit"


def content_hash(config: KitConfig) -> str:
    """Hash of everything that decides the kit's bytes: recipe version, config, shapes, Python
    version and the stdlib file listing (another Python means another corpus)."""
    blob = json.dumps(
        {
            "kit_version": KIT_VERSION,
            "python": list(sys.version_info[:3]),
            "config": config.content_fields(),
            "shapes": config.all_shapes(),
            "stdlib": stdlib_listing(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def part_hash(config: KitConfig, name: str) -> str:
    """Hash of what decides one trained model (its shape, data and training settings)."""
    blob = json.dumps(
        {
            "kit_version": KIT_VERSION,
            "python": list(sys.version_info[:3]),
            "model": name,
            "fields": config.training_fields(name),
            "shape": config.all_shapes()[name],
            "stdlib": stdlib_listing(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def part_location(config: KitConfig, name: str) -> str:
    return os.path.join(storage.cache_root(), "kit", "parts", f"{name}-{part_hash(config, name)}")


def kit_location(config: KitConfig, digest: str) -> str:
    """config.out, else $SD2_KIT_DIR, else <cache>/kit/<content-hash>."""
    out = config.out or os.environ.get("SD2_KIT_DIR") or os.path.join(storage.cache_root(), "kit", digest)
    return os.path.abspath(out)


def is_current(kit_dir: str, digest: str) -> bool:
    """A complete kit built from the same content hash."""
    if not manifest.is_complete(kit_dir):
        return False
    try:
        with open(os.path.join(kit_dir, KIT_JSON)) as f:
            return json.load(f).get("content_hash") == digest
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def build_lock(kit_dir: str) -> Iterator[None]:
    """One builder per location across processes (parallel test sessions share the cache)."""
    os.makedirs(os.path.dirname(kit_dir), exist_ok=True)
    with open(kit_dir.rstrip("/") + ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the kit at %s; waiting", kit_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
