"""The eval report's figures from one decoding run: overall (MAL, acceptance, MACs, cost,
predicted and measured speedup, losslessness) and the same figures per task category.

A category's figures come from :func:`figures` itself, fed with that category's prompts only,
so the overall and per-category numbers can never drift apart in how they are computed. Its
measured speedup needs the category's own decoding time on both sides: the eval decodes each
category in batches of its own (:func:`sd2_ray.evaluate.core.batches`), so every batch's wall and
CPU time belongs to exactly one category.
"""

from __future__ import annotations

import math
from typing import Any

from sd2_ray.models.macs import cost_coefficient, predicted_speedup
from sd2_ray.rows import category_of
from sd2_ray.specdec.types import SpecStats

UNCATEGORIZED = "uncategorized"  # rows without a category, when other rows have one
# what a category's entry keeps of the figures (MACs and cost are the pair's, not the prompts')
CATEGORY_KEYS = (
    "mean_accepted_length",
    "mal_ci95",
    "acceptance_rate",
    "per_position_acceptance",
    "predicted_speedup",
    "measured_speedup",
    "measured_speedup_cpu",
    "tokens_per_second",
    "baseline_tokens_per_second",
    "seconds",
    "generated_tokens",
    "target_passes",
    "num_drafts",
    "num_draft_tokens",
    "num_accepted_tokens",
    "lossless",
)


def prompt_categories(rows: list[dict[str, Any]]) -> list[str] | None:
    """Each row's category label, or None when no row names one (then nothing is grouped and the
    report's ``categories`` is empty); rows without one are ``uncategorized`` beside the others."""
    named = [category_of(row) for row in rows]
    if not any(named):
        return None
    return [name or UNCATEGORIZED for name in named]


def mal_interval(request_stats: list[SpecStats]) -> list[float] | None:
    """The 95 % interval of the MAL of these requests, as the normal approximation of a ratio
    estimator (MAL = committed tokens / target passes, summed over requests that are the sample
    units); None below two requests that verified anything."""
    units = [(s.committed_tokens, s.target_passes) for s in request_stats if s.target_passes]
    n = len(units)
    if n < 2:
        return None
    passes = sum(p for _, p in units)
    mal = sum(c for c, _ in units) / passes
    residual = sum((c - mal * p) ** 2 for c, p in units) / (n - 1)
    half = 1.96 * math.sqrt(residual / n) / (passes / n)
    return [mal - half, mal + half]


def figures(
    stats: SpecStats, seconds: float, cpu: float, outputs, baseline, t_macs, d_macs, k: int, temperature: float
) -> dict[str, Any]:
    """The report's numbers for these outputs; ``baseline``: the target-only decoding of the same
    prompts (``tokens_per_second``, ``seconds``, ``cpu_seconds``, ``generated_tokens``,
    ``outputs``), or None."""
    tokens = sum(len(o) for o in outputs)
    tps = tokens / seconds if seconds else 0.0
    cost = cost_coefficient(d_macs, t_macs)
    mal = stats.mean_accepted_length
    out: dict[str, Any] = {
        "mean_accepted_length": mal,
        "acceptance_rate": stats.acceptance_rate,
        "per_position_acceptance": stats.per_position_acceptance(),
        "num_speculative_tokens": k,
        "target_macs_per_token": t_macs["macs"],
        "drafter_macs_per_token": d_macs["macs"],
        "target_dense_macs_per_token": t_macs["dense_macs"],
        "drafter_dense_macs_per_token": d_macs["dense_macs"],
        "drafter_sparsity": d_macs["sparsity"],
        "target_attention_macs_per_context_token": t_macs["attention_macs_per_context_token"],
        "drafter_attention_macs_per_context_token": d_macs["attention_macs_per_context_token"],
        "cost_coefficient": cost,
        "predicted_speedup": predicted_speedup(mal, k, cost),
        "tokens_per_second": tps,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_tokens_per_second": tokens / cpu if cpu else 0.0,
        "measured_speedup_cpu": None,
        "generated_tokens": tokens,
        "target_passes": stats.target_passes,
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "temperature": temperature,
        "measured_speedup": None,
        "baseline_tokens_per_second": None,
        "lossless": None,
    }
    if baseline is not None:
        base_tps = baseline["tokens_per_second"]
        out["baseline_tokens_per_second"] = base_tps
        out["baseline_seconds"] = baseline["seconds"]
        out["measured_speedup"] = tps / base_tps if base_tps else None
        base_cpu = baseline.get("cpu_seconds")
        if base_cpu and cpu:
            out["measured_speedup_cpu"] = base_cpu / baseline["generated_tokens"] * tokens / cpu
        if temperature == 0.0:
            mismatched = [i for i, (a, b) in enumerate(zip(outputs, baseline["outputs"], strict=True)) if a != b]
            out["lossless"] = not mismatched
            out["lossless_mismatches"] = mismatched
    return out


def category_figures(categories: list[str] | None, decoded, baseline, t_macs, d_macs, k: int, temperature: float):
    """{category: figures of its prompts} (:data:`CATEGORY_KEYS` and ``prompts``), in name order;
    empty when no row names a category. ``decoded``: the speculative run's
    :class:`~sd2_ray.evaluate.core.Decoded`; ``baseline``: the target-only result or None."""
    if not categories:
        return {}
    out = {}
    for name in sorted(set(categories)):
        members = [i for i, label in enumerate(categories) if label == name]
        stats = SpecStats(num_speculative_tokens=k, accepted_per_position=[0] * k)
        for i in members:
            stats = stats.merge(decoded.request_stats[i])
        seconds, cpu = decoded.category_seconds.get(name, (0.0, 0.0))
        outputs = [decoded.outputs[i] for i in members]
        base = category_baseline(baseline, categories, name, members)
        numbers = figures(stats, seconds, cpu, outputs, base, t_macs, d_macs, k, temperature)
        numbers["mal_ci95"] = mal_interval([decoded.request_stats[i] for i in members])
        out[name] = {"prompts": len(members), **{key: numbers[key] for key in CATEGORY_KEYS}}
    return out


def category_baseline(baseline, categories: list[str], name: str, members: list[int]) -> dict[str, Any] | None:
    """The target-only figures of one category's prompts. Its timing counts only when the
    baseline was decoded with the same categories (hence the same per-category batches); else
    the category's measured speedup is None and only losslessness is judged."""
    if baseline is None:
        return None
    outputs = [baseline["outputs"][i] for i in members]
    tokens = sum(len(o) for o in outputs)
    timed = baseline.get("categories") == categories and name in (baseline.get("category_seconds") or {})
    seconds, cpu = baseline["category_seconds"][name] if timed else (0.0, 0.0)
    return {
        "outputs": outputs,
        "generated_tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "tokens_per_second": tokens / seconds if seconds else None,
    }
