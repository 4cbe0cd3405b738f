"""The paper comparison: a pipeline report's headline ratios beside SD²'s published figures
(Lasby et al., arXiv 2504.08838), and whether each claim's direction holds in this run.

Pure: reads the report's ``comparisons`` and ``drafters`` (see ``sd2_ray.pipeline.report``), imports
nothing heavy. The paper states no MAL figure for SD² against plain SFT on the reference answers;
that row carries the direction only (self-distillation is what aligns the drafter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# How far the layer baseline's MACs may be from SD²'s for "at equal MACs" to hold.
EQUAL_MACS_TOLERANCE = 0.05


@dataclass(frozen=True)
class Claim:
    key: str  # the ratio's key in report["comparisons"]
    label: str
    paper: float | None  # the paper's figure (None: not stated)
    unit: str  # "x" (ratio) or "%" (fraction shown as a percentage)
    direction: str  # what "holds" means, in words
    holds: Callable[[float, dict[str, float]], bool]


CLAIMS = (
    Claim(
        "sd2_mal_over_layer_pruned",
        "SD² MAL / layer-pruned MAL at equal MACs",
        1.59,
        "x",
        "SD² above the layer-pruned drafter (> 1)",
        lambda v, c: v > 1.0,
    ),
    Claim(
        "sd2_macs_reduction_vs_dense_sd",
        "SD² MAC cut vs dense-sd",
        0.4387,
        "%",
        "SD² cheaper than the dense drafter (> 0)",
        lambda v, c: v > 0.0,
    ),
    Claim(
        "sd2_mal_drop_vs_dense_sd",
        "SD² MAL drop vs dense-sd",
        0.0836,
        "%",
        "MAL given up is smaller than the MACs saved",
        lambda v, c: v < c.get("sd2_macs_reduction_vs_dense_sd", 0.0),
    ),
    Claim(
        "sd2_mal_over_sparse_sft",
        "SD² MAL / sparse-sft MAL (self-distillation's effect)",
        None,
        "x",
        "self-distilled above reference-answer SFT (> 1)",
        lambda v, c: v > 1.0,
    ),
)


def equal_macs_ratio(drafters: list[dict[str, Any]]) -> float | None:
    """Layer-pruned drafter MACs / SD² drafter MACs (1.0 = the comparison is at equal cost)."""
    by = {d["name"]: d for d in drafters}
    if "sd2" not in by or "layer-pruned-sd" not in by or not by["sd2"].get("drafter_macs_per_token"):
        return None
    return by["layer-pruned-sd"]["drafter_macs_per_token"] / by["sd2"]["drafter_macs_per_token"]


def paper_comparison(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim this run can speak to: ratio, ours, paper's figure, direction, holds."""
    found = report.get("comparisons") or {}
    rows = []
    for claim in CLAIMS:
        if claim.key not in found:
            continue
        value = float(found[claim.key])
        rows.append(
            {
                "ratio": claim.key,
                "label": claim.label,
                "ours": value,
                "paper": claim.paper,
                "unit": claim.unit,
                "direction": claim.direction,
                "holds": bool(claim.holds(value, found)),
            }
        )
    macs = equal_macs_ratio(report.get("drafters") or [])
    if macs is not None:
        rows.append(
            {
                "ratio": "layer_pruned_macs_over_sd2",
                "label": "layer-pruned MACs / SD² MACs",
                "ours": macs,
                "paper": 1.0,
                "unit": "x",
                "direction": f"equal MACs (within {EQUAL_MACS_TOLERANCE:.0%})",
                "holds": abs(macs - 1.0) <= EQUAL_MACS_TOLERANCE,
            }
        )
    return rows


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "not stated"
    return f"{value:.2%}" if unit == "%" else f"{value:.3f}x"


def paper_markdown(report: dict[str, Any]) -> str:
    """The "paper comparison" section of report.md (empty when no claim applies)."""
    rows = report.get("paper_comparison")
    if rows is None:
        rows = paper_comparison(report)
    if not rows:
        return ""
    lines = ["## Paper comparison\n", "| ratio | this run | paper (SD²) | direction | holds |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {_shown(row['ours'], row['unit'])} | {_shown(row['paper'], row['unit'])} "
            f"| {row['direction']} | {'yes' if row['holds'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["CLAIMS", "paper_comparison", "paper_markdown"]
