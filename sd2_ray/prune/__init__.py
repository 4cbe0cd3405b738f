"""One-shot pruning: SparseGPT, Wanda, magnitude (unstructured or N:M) and layer pruning.

Pure torch (no Ray). Entry points for other stages::

    from sd2_ray.prune import prune_model, layer_prune, run_prune, PruneConfig

(``prune_model`` masks weights: SparseGPT, Wanda, magnitude; ``layer_prune`` drops whole blocks.)

Names are resolved lazily so ``import sd2_ray.prune.config`` (the CLI) stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PruneConfig": "sd2_ray.prune.config",
    "prune_model": "sd2_ray.prune.sequential",
    "layer_prune": "sd2_ray.prune.layers",
    "run_prune": "sd2_ray.prune.job",
    "load_calibration": "sd2_ray.prune.calibration",
    "perplexity": "sd2_ray.prune.quality",
    "verify_pruned": "sd2_ray.prune.verify",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd2_ray.prune' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
