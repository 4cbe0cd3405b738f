"""The search space as plain data (no Ray): pruning points, the grid, cache keys, the objective.

Ray Tune's ``grid_search`` is the literal ``{"grid_search": [...]}``; building it here keeps
this module importable (and unit-testable) without Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any

from sd2_ray.tune.config import TuneConfig

UNSTRUCTURED = "unstructured"


def pruning_points(config: TuneConfig) -> list[dict[str, Any]]:
    """Every (sparsity, pattern) searched: the unstructured levels, then the N:M patterns."""
    from sd2_ray.prune.config import parse_pattern

    points = [{"sparsity": float(s), "pattern": UNSTRUCTURED} for s in config.search_space.sparsity]
    for pattern in config.search_space.pattern:
        nm = parse_pattern(pattern)
        assert nm is not None  # SearchSpace admits N:M patterns only
        n, m = nm
        points.append({"sparsity": 1.0 - n / m, "pattern": pattern})
    return points


def axes(config: TuneConfig) -> dict[str, list]:
    """Name -> values of every searched axis (a single-valued axis is still listed)."""
    space = config.search_space
    out: dict[str, list] = {"pruning": pruning_points(config), "lr": list(space.lr)}
    if space.epochs:
        out["epochs"] = list(space.epochs)
    if space.method:
        out["method"] = list(space.method)
    return out


def param_space(config: TuneConfig) -> dict[str, Any]:
    """Tune's param_space: one grid_search per axis (num_samples repeats the whole grid)."""
    return {name: {"grid_search": values} for name, values in axes(config).items()}


def grid(config: TuneConfig) -> list[dict[str, Any]]:
    """The resolved trial parameters in Tune's grid order: Tune sorts the axes by name and the
    first one varies fastest."""
    named = axes(config)
    names = sorted(named)
    combos = itertools.product(*(named[n] for n in reversed(names)))
    return [dict(zip(reversed(names), combo, strict=True)) for combo in combos]


def trial_method(config: TuneConfig, params: dict[str, Any]) -> str:
    return params.get("method") or config.prune.method


def trial_epochs(config: TuneConfig, params: dict[str, Any]) -> int:
    return int(params.get("epochs") or config.finetune.epochs)


def prune_fields(config: TuneConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Everything a trial's PruneConfig holds except its output (which is keyed by this)."""
    point = params["pruning"]
    fields = {
        **config.prune.model_dump(exclude_unset=True),
        "model": config.drafter,
        "method": trial_method(config, params),
    }
    if fields["method"] != "magnitude":
        fields["calibration"] = config.calibration or config.data
    if point["pattern"] == UNSTRUCTURED:
        fields["sparsity"] = point["sparsity"]
    else:
        fields["pattern"] = point["pattern"]
    return fields


def prune_key(fields: dict[str, Any]) -> str:
    """Cache key of a pruned model: readable (method, sparsity) plus a hash of every setting, so
    trials that share a pruning point share one pruned model and a changed setting never hits
    a stale one."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if fields.get("pattern"):
        level = fields["pattern"].replace(":", "of")
    else:
        level = f"s{fields['sparsity']:.3f}".rstrip("0").rstrip(".")
    return f"{fields['method']}-{level}-{digest}"


NO_LIMIT_STEPS = 1_000_000  # ASHA's horizon when trials run whole epochs (no max_steps)


def asha_max_t(config: TuneConfig) -> int | None:
    """ASHA's max_t, one step short of the trials' last step: ASHA also compares trials at a rung
    equal to max_t, which would stop fully trained trials right before their eval. None when no
    rung fits before the last step (grace_period too long): then ASHA cannot stop anything."""
    max_t = config.max_steps - 1 if config.max_steps else NO_LIMIT_STEPS
    return max_t if max_t >= config.asha.grace_period else None


def objective_value(metrics: dict[str, Any], objective: str) -> float | None:
    """The objective of a finished trial's metrics (None when it was not measured)."""
    key = "mal" if objective == "mal" else "predicted_speedup"
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def finite_or_inf(value: Any) -> float:
    """A loss Tune/ASHA can compare: NaN or overflowed losses become +inf (worst), not NaN
    (NaN compares false with everything, so ASHA would never stop a diverged trial)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf
