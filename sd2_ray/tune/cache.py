"""Pruned-model cache shared by the trials of one search: each pruning point is pruned once.

Trials with the same (method, sparsity/pattern, settings) share ``OUTPUT/pruned-cache/<key>``.
The pruning itself runs as a Ray task with the prune section's GPUs (see ``run_prune``).
Two trials may want the same key at the same moment (on any node), so pruning goes through one
named, threaded actor started by the search driver: a per-key lock makes the second trial wait
for the first one's result instead of pruning into the same directory. ``run_prune`` itself skips
a complete output, so a restored search reuses everything already pruned.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

ACTOR_PREFIX = "sd2-prune-cache-"


class PruneCache:
    """Serialises pruning per cache key (Ray actor body; see :func:`start`)."""

    def __init__(self):
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def ensure(self, fields: dict[str, Any], output: str) -> dict[str, Any]:
        """Prune into ``output`` unless it is complete; returns {"path", "pruned_now"}."""
        from sd2_ray import manifest
        from sd2_ray.prune.config import PruneConfig
        from sd2_ray.prune.job import run_prune

        with self._guard:
            lock = self._locks.setdefault(output, threading.Lock())
        with lock:
            if manifest.is_complete(output):
                return {"path": output, "pruned_now": False}
            log.info("pruning %s", output)
            run_prune(PruneConfig.model_validate({**fields, "output": output}))
            return {"path": output, "pruned_now": True}


def actor_name(experiment: str) -> str:
    """One actor per search (by experiment path), so two searches on one cluster never share locks."""
    import hashlib

    return ACTOR_PREFIX + hashlib.sha256(experiment.encode()).hexdigest()[:12]


def start(experiment: str):
    """The search's cache actor (created by the driver, so it lives exactly as long as the search)."""
    import ray

    # num_cpus 0: the actor only waits; run_prune runs each pruning as its own Ray task holding
    # the prune section's num_gpus/num_cpus (outside any trial's placement group).
    # restarted, and its calls retried, when its node is lost: ensure() skips a complete output
    remote = ray.remote(num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=-1)(PruneCache)
    return remote.options(name=actor_name(experiment), get_if_exists=True).remote()


def ensure_pruned(experiment: str, fields: dict[str, Any], output: str) -> dict[str, Any]:
    """From a trial: the pruned model for ``fields`` (pruned now, or by an earlier trial)."""
    import ray

    actor = ray.get_actor(actor_name(experiment))
    return ray.get(actor.ensure.remote(fields, output))
