"""Results of a search (no Ray): the trial table, the best trial, the MAL-vs-MACs Pareto front,
``trials.json``, ``tune_report.md``, ``pareto.png`` and the best drafter copied to ``best/``."""

from __future__ import annotations

import io
import logging
import math
from typing import Any

from sd2_ray import storage
from sd2_ray.tune.space import objective_value

log = logging.getLogger(__name__)

COMPLETED, STOPPED, ERRORED = "completed", "stopped early", "errored"
TRIALS_FILE = "trials.json"
REPORT_FILE = "tune_report.md"
PLOT_FILE = "pareto.png"
BEST_DIR = "best"
BEST_FILE = "best.json"


def trial_status(record: dict[str, Any]) -> str:
    """errored (an exception), completed (the trial's eval was reported), else stopped early (ASHA)."""
    if record.get("error"):
        return ERRORED
    return COMPLETED if record.get("metrics", {}).get("evaluated") else STOPPED


def trial_row(record: dict[str, Any], objective: str) -> dict[str, Any]:
    """One row of the table / one object of trials.json."""
    params, metrics = record.get("params") or {}, record.get("metrics") or {}
    pruning = params.get("pruning") or {}
    status = trial_status(record)
    steps = record.get("steps_reported") or []
    row = {
        "trial_id": record.get("trial_id"),
        "sparsity": pruning.get("sparsity", metrics.get("sparsity")),
        "pattern": pruning.get("pattern", metrics.get("pattern")),
        "method": metrics.get("method") or params.get("method"),
        "lr": params.get("lr", metrics.get("lr")),
        "epochs": params.get("epochs", metrics.get("epochs")),
        "status": status,
        "steps": metrics.get("step") if metrics.get("step") is not None else (max(steps) if steps else 0),
        "loss": metrics.get("loss"),
        "mal": metrics.get("mal") if status == COMPLETED else None,
        "acceptance_rate": metrics.get("acceptance_rate") if status == COMPLETED else None,
        "drafter_macs": metrics.get("drafter_macs") if status == COMPLETED else None,
        "cost_coefficient": metrics.get("cost_coefficient") if status == COMPLETED else None,
        "predicted_speedup": metrics.get("predicted_speedup") if status == COMPLETED else None,
        "category_mal": metrics.get("category_mal") if status == COMPLETED else None,
        "objective": objective_value(metrics, objective) if status == COMPLETED else None,
        "attempts": metrics.get("attempt"),
        "drafter": metrics.get("drafter") if status == COMPLETED else None,
        "error": record.get("error"),
    }
    return row


def table(records: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    rows = [trial_row(r, objective) for r in records]
    return sorted(rows, key=lambda r: (str(r["pattern"]), r["sparsity"] or 0.0, r["lr"] or 0.0, str(r["trial_id"])))


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest objective (ties: fewer drafter MACs)."""
    scored = [r for r in rows if r["status"] == COMPLETED and r["objective"] is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["objective"], -(r["drafter_macs"] or 0)))


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials no other one beats on both MAL (higher) and drafter MACs (lower)."""
    points = [r for r in rows if r["status"] == COMPLETED and r["mal"] is not None and r["drafter_macs"] is not None]

    def dominated(p):
        return any(
            q["mal"] >= p["mal"]
            and q["drafter_macs"] <= p["drafter_macs"]
            and (q["mal"] > p["mal"] or q["drafter_macs"] < p["drafter_macs"])
            for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda r: r["drafter_macs"])


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def markdown(
    rows: list[dict[str, Any]], best: dict[str, Any] | None, front: list[dict[str, Any]], objective: str, k: int
) -> str:
    """tune_report.md: every trial, the best one, the Pareto front."""
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED, ERRORED)}
    lines = [
        "# Tune report",
        "",
        f"Objective: **{objective}** (predicted speedup = MAL / (K·c + 1), K = {k}, "
        "c = drafter MACs / target MACs per token, nonzero weights counted).",
        f"Trials: {len(rows)} ({counts[COMPLETED]} completed, {counts[STOPPED]} stopped early by ASHA, "
        f"{counts[ERRORED]} errored).",
        "",
        "| trial | sparsity | pattern | lr | status | steps | loss | MAL | drafter MACs | c | predicted speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **best**" if best is not None and r["trial_id"] == best["trial_id"] else ""
        lines.append(
            f"| {r['trial_id']}{mark} | {_fmt(r['sparsity'], '.3g')} | {r['pattern']} | {_fmt(r['lr'], '.3g')} "
            f"| {r['status']} | {r['steps']} | {_fmt(r['loss'])} | {_fmt(r['mal'])} "
            f"| {_fmt(r['drafter_macs'], ',')} | {_fmt(r['cost_coefficient'])} "
            f"| {_fmt(r['predicted_speedup'])} |"
        )
    lines.append("")
    if best is None:
        lines.append("No trial completed: no best drafter.")
    else:
        lines.append(
            f"Best: trial {best['trial_id']} (sparsity {_fmt(best['sparsity'], '.3g')}, "
            f"{best['pattern']}, lr {_fmt(best['lr'], '.3g')}): {objective} {_fmt(best['objective'])}, "
            f"copied to `{BEST_DIR}/`."
        )
    lines += [
        "",
        "Pareto front (MAL vs drafter MACs): "
        + (
            ", ".join(f"{r['trial_id']} (MAL {_fmt(r['mal'])}, {_fmt(r['drafter_macs'], ',')} MACs)" for r in front)
            or "empty"
        ),
        "",
        f"![Pareto front]({PLOT_FILE})",
        "",
    ]
    errors = [r for r in rows if r["status"] == ERRORED]
    if errors:
        lines += ["Errors:", ""] + [f"- {r['trial_id']}: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def plot_pareto(rows: list[dict[str, Any]], front: list[dict[str, Any]], best: dict[str, Any] | None) -> bytes:
    """PNG: every completed trial as MAL vs drafter MACs, the front as a line, the best circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == COMPLETED and r["mal"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in done:
        ax.scatter(r["drafter_macs"], r["mal"], color="tab:blue")
        ax.annotate(
            f"s={_fmt(r['sparsity'], '.2g')} lr={_fmt(r['lr'], '.1g')}",
            (r["drafter_macs"], r["mal"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if front:
        ax.plot(
            [r["drafter_macs"] for r in front],
            [r["mal"] for r in front],
            color="tab:orange",
            marker="o",
            label="Pareto front",
        )
    if best is not None:
        ax.scatter([best["drafter_macs"]], [best["mal"]], s=160, facecolors="none", edgecolors="tab:red", label="best")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # 6-digit MACs overlap otherwise
    ax.set_xlabel("drafter MACs per token (nonzero weights)")
    ax.set_ylabel("mean accepted length (MAL)")
    ax.set_title("Search: MAL vs draft cost")
    if front or best is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_reports(output: str, records: list[dict[str, Any]], objective: str, k: int) -> dict[str, Any]:
    """Write trials.json, tune_report.md, pareto.png and best/ (+ best.json); returns a summary."""
    rows = table(records, objective)
    best = best_row(rows)
    front = pareto_front(rows)
    storage.write_json(storage.join(output, TRIALS_FILE), rows)
    storage.write_text(storage.join(output, REPORT_FILE), markdown(rows, best, front, objective, k))
    storage.write_bytes(storage.join(output, PLOT_FILE), plot_pareto(rows, front, best))
    if best is not None:
        copy_best(best, output)
    return {
        "trials": len(rows),
        "completed": sum(r["status"] == COMPLETED for r in rows),
        "stopped_early": sum(r["status"] == STOPPED for r in rows),
        "errored": sum(r["status"] == ERRORED for r in rows),
        "best": best,
        "pareto": [r["trial_id"] for r in front],
    }


def copy_best(best: dict[str, Any], output: str) -> str:
    """The best trial's drafter (weights, tokenizer, masks, sparsity.json) into OUTPUT/best/."""
    dest = storage.join(output, BEST_DIR)
    storage.delete(dest)  # a rerun with another winner must not leave a mix of two drafters
    storage.copy_dir(best["drafter"], dest)
    storage.write_json(storage.join(output, BEST_FILE), best)
    log.info("tune: best trial %s -> %s", best["trial_id"], dest)
    return dest
