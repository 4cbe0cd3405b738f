"""Write an eval report: report.json, report.md and a plot of acceptance by draft position."""

from __future__ import annotations

import io
from typing import Any

from sd2_ray import storage

PLOT_NAME = "acceptance_by_position.png"
MARKDOWN_NAME = "report.md"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Speculative decoding eval",
        "",
        f"- target: `{report.get('target')}`",
        f"- drafter: `{report.get('drafter')}`" + (" (cross-tokenizer, UAG)" if report.get("cross_tokenizer") else ""),
        f"- prompts: {report['num_prompts']}, max new tokens {report['max_new_tokens']}, "
        f"batch size {report['batch_size']}, temperature {report['temperature']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    rows = [
        ("K (speculative tokens)", report["num_speculative_tokens"]),
        ("mean accepted length (MAL, bonus included)", report["mean_accepted_length"]),
        ("acceptance rate (accepted / drafted)", report["acceptance_rate"]),
        ("target MACs / token (nonzero linear weights)", report["target_macs_per_token"]),
        ("drafter MACs / token", report["drafter_macs_per_token"]),
        ("drafter sparsity (linear layers)", report["drafter_sparsity"]),
        ("cost coefficient c", report["cost_coefficient"]),
        ("predicted speedup MAL / (K·c + 1)", report["predicted_speedup"]),
        ("measured speedup (wall clock vs target-only)", report["measured_speedup"]),
        ("measured speedup (process CPU time)", report.get("measured_speedup_cpu")),
        ("tokens / s (speculative)", report["tokens_per_second"]),
        ("tokens / s (target-only)", report.get("baseline_tokens_per_second")),
        ("lossless (greedy: outputs equal target-only)", report.get("lossless")),
    ]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    lines += category_table(report.get("categories") or {})
    lines += [
        "",
        "Acceptance by draft position: "
        + ", ".join(f"{i + 1}: {p:.3f}" for i, p in enumerate(report["per_position_acceptance"])),
        "",
        f"![acceptance by position]({PLOT_NAME})",
        "",
    ]
    return "\n".join(lines)


def category_table(categories: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the per-category figures (none without categories)."""
    if not categories:
        return []
    lines = [
        "",
        "| category | prompts | MAL | MAL 95 % interval | acceptance | predicted | measured | lossless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in categories.items():
        cells = [name, c["prompts"], c["mean_accepted_length"], interval_text(c.get("mal_ci95"))]
        cells += [c["acceptance_rate"], c["predicted_speedup"]]
        cells += [c.get("measured_speedup"), c.get("lossless")]
        lines.append("| " + " | ".join(_fmt(v) for v in cells) + " |")
    return lines


def interval_text(interval: list[float] | None) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "n/a"


def category_lines(report: dict[str, Any]) -> list[str]:
    """One console line per category (none without categories)."""
    return [
        f"  {name}: MAL {c['mean_accepted_length']:.3f} (95 % {interval_text(c.get('mal_ci95'))}), "
        f"acceptance {c['acceptance_rate']:.3f}, "
        f"{c['prompts']} prompts, predicted {c['predicted_speedup']:.2f}x, measured "
        + (f"{c['measured_speedup']:.2f}x" if c.get("measured_speedup") else "n/a")
        for name, c in (report.get("categories") or {}).items()
    ]


def plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = report["per_position_acceptance"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.bar(range(1, len(values) + 1), values, color="#4878cf")
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, len(values) + 1))
    ax.set_title(f"MAL {report['mean_accepted_length']:.2f} (K={report['num_speculative_tokens']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], report_path: str) -> list[str]:
    """Write report.json (outputs dropped: they can be large), report.md and the plot."""
    out_dir = storage.parent(report_path)
    slim = {k: v for k, v in report.items() if k != "outputs"}
    storage.write_json(report_path, slim)
    storage.write_text(storage.join(out_dir, MARKDOWN_NAME), render_markdown(report))
    storage.write_bytes(storage.join(out_dir, PLOT_NAME), plot_png(report))
    return [storage.basename(report_path), MARKDOWN_NAME, PLOT_NAME]
