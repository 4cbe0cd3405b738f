"""The pipeline's report: one row per drafter (the paper's comparison), a Markdown table, and
two plots (MAL vs drafter MACs; acceptance by draft position); with more than one task category
in the eval prompts, also a drafters x categories MAL table and a bar plot of it."""

from __future__ import annotations

import io
from typing import Any

from sd2_ray import storage
from sd2_ray.evaluate.paper import paper_comparison, paper_markdown
from sd2_ray.pipeline.config import PipelineConfig

ENTRY_KEYS = (
    "mean_accepted_length",
    "acceptance_rate",
    "per_position_acceptance",
    "drafter_macs_per_token",
    "drafter_dense_macs_per_token",
    "drafter_sparsity",
    "cost_coefficient",
    "predicted_speedup",
    "measured_speedup",
    "tokens_per_second",
    "lossless",
    "cross_tokenizer",
    "drafter",
)
CATEGORY_PLOT = "mal_by_category.png"
DESCRIPTIONS = {
    "dense": "drafter base, as pretrained",
    "dense-sd": "dense, fine-tuned on self-distilled data",
    "layer-pruned-sd": "layer-pruned (angular distance), fine-tuned on self-distilled data",
    "sd2": "SD²: pruned, sparse-fine-tuned on self-distilled data",
    "sd2-kd": "SD² with a distillation loss: the sd2 drafter's pruned model, data and budget, trained on the "
    "target's stored top-k distribution",
    "sparse-sft": "same sparse drafter, fine-tuned on the reference answers",
    "uag": "cross-family drafter (other tokenizer), as pretrained",
    "eagle": "EAGLE feature head of the target, trained on its streamed features",
    "fspad": "FSPAD feature head: EAGLE + feature sampling + partial alignment distillation",
}


def drafter_entries(
    reports: dict[str, dict[str, Any]], training: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One report row per drafter; a fine-tuned one also says how it was trained (``training``)."""
    training = training or {}
    return [
        {
            "name": name,
            "description": DESCRIPTIONS.get(name, ""),
            **{k: r.get(k) for k in ENTRY_KEYS},
            "categories": r.get("categories") or {},  # an eval from before categories has none
            **({"training": training[name]} if name in training else {}),
        }
        for name, r in reports.items()
    ]


def training_of(config: PipelineConfig, name: str) -> dict[str, Any]:
    """How the run fine-tuned drafter ``name``: its loss, its data and which step was published
    (from its config as :func:`~sd2_ray.pipeline.chain.finetune_config` builds it, and its metrics.json)."""
    from sd2_ray.pipeline.chain import finetune_config

    ft = finetune_config(config, name)
    distilled = ft.response_field == "response"
    info: dict[str, Any] = {
        "loss": ft.loss,
        "ce_weight": ft.ce_weight if ft.loss != "ce" else None,
        "kd_temperature": ft.kd_temperature if ft.loss != "ce" else None,
        "data": ft.data,
        "column": ft.response_field,
        "distill_mode": config.distill.mode if distilled else None,
        "logprobs_top_k": config.distill.logprobs_top_k if distilled else None,
        "select_by": ft.select_by if ft.eval_every else "final",
        "eval_every": ft.eval_every,
    }
    if ft.feature_head is not None:  # a head learns the target's features and next tokens
        head = ft.feature_head
        info["loss"] = f"{head.feature_weight:g}·feature + {head.token_weight:g}·token"
        info.update(ce_weight=None, kd_temperature=None, feature_layers=head.layers, ttt_steps=head.ttt_steps)
    metrics = storage.join(ft.output, "metrics.json")
    if storage.exists(metrics):
        done = storage.read_json(metrics)
        info.update(steps=done.get("steps_done"), published_step=done.get("published_step", done.get("steps_done")))
    return info


def training_text(info: dict[str, Any]) -> str:
    """One phrase for report.md: loss, data, published step."""
    kd = info["loss"] != "ce" and info.get("feature_layers") is None
    loss = f"{info['loss']} + {info['ce_weight']:g}·ce" if kd and info["ce_weight"] else info["loss"]
    if info["column"] != "response":
        data = f"the '{info['column']}' column"
    else:  # the top-k are named only where the loss reads them
        data = f"{info['distill_mode']} data" + (
            f" with the target's top-{info['logprobs_top_k']} log-probs" if kd and info["logprobs_top_k"] else ""
        )
    text = f"loss {loss} on {data}"
    if info.get("published_step") is not None:
        chosen = f", chosen by held-out {info['select_by']}" if info["select_by"] != "final" else ""
        text += f"; published step {info['published_step']} of {info['steps']}{chosen}"
    return text


def comparisons(entries: list[dict[str, Any]]) -> dict[str, float]:
    """The paper's headline ratios, where both drafters were evaluated."""
    by = {e["name"]: e for e in entries}
    out: dict[str, float] = {}
    if "sd2" in by and "layer-pruned-sd" in by and by["layer-pruned-sd"]["mean_accepted_length"]:
        out["sd2_mal_over_layer_pruned"] = (
            by["sd2"]["mean_accepted_length"] / by["layer-pruned-sd"]["mean_accepted_length"]
        )
    if "sd2" in by and "dense-sd" in by:
        dense, sparse = by["dense-sd"], by["sd2"]
        out["sd2_macs_reduction_vs_dense_sd"] = 1 - sparse["drafter_macs_per_token"] / dense["drafter_macs_per_token"]
        out["sd2_mal_drop_vs_dense_sd"] = 1 - sparse["mean_accepted_length"] / dense["mean_accepted_length"]
    if "sd2" in by and "sparse-sft" in by and by["sparse-sft"]["mean_accepted_length"]:
        out["sd2_mal_over_sparse_sft"] = by["sd2"]["mean_accepted_length"] / by["sparse-sft"]["mean_accepted_length"]
    if "sd2-kd" in by and "sd2" in by and by["sd2"]["mean_accepted_length"]:
        out["sd2_kd_mal_over_sd2"] = by["sd2-kd"]["mean_accepted_length"] / by["sd2"]["mean_accepted_length"]
    if "sd2" in by and "dense" in by and by["dense"]["mean_accepted_length"]:
        out["sd2_mal_over_dense_base"] = by["sd2"]["mean_accepted_length"] / by["dense"]["mean_accepted_length"]
    return out


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| drafter | MAL | acceptance | drafter MACs/token | sparsity | c | predicted | measured | lossless |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            " | ".join(
                [
                    f"| {e['name']}",
                    _num(e["mean_accepted_length"], ".3f"),
                    _num(e["acceptance_rate"], ".3f"),
                    _num(e["drafter_macs_per_token"], ","),
                    _num(e["drafter_sparsity"], ".2f"),
                    _num(e["cost_coefficient"], ".3f"),
                    _num(e["predicted_speedup"], ".2f") + "x",
                    _num(e["measured_speedup"], ".2f") + "x",
                    str(e["lossless"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def category_names(entries: list[dict[str, Any]]) -> list[str]:
    """Every category any drafter was measured on, in name order."""
    return sorted({name for e in entries for name in e["categories"]})


def category_table(entries: list[dict[str, Any]]) -> str:
    """Drafters x categories MAL (prompts per category in the header); empty with fewer than two
    categories, where it would repeat the overall MAL."""
    names = category_names(entries)
    if len(names) < 2:
        return ""
    prompts = {n: next(e["categories"][n]["prompts"] for e in entries if n in e["categories"]) for n in names}
    lines = [
        "| drafter | " + " | ".join(f"{n} ({prompts[n]})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for e in entries:
        cells = [_num((e["categories"].get(n) or {}).get("mean_accepted_length"), ".3f") for n in names]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# SD² pipeline report\n\nTarget `{report['target']}`, K = {report['num_speculative_tokens']}, "
        f"{report['num_prompts']} held-out prompts, target {report['target_macs_per_token']:,} MACs/token.\n",
        markdown_table(report["drafters"]),
        "",
        "Predicted speedup = MAL / (K·c + 1) with c from counted nonzero MACs; measured = wall-clock "
        "tokens/s against target-only decoding in the same run (dense kernels: zeros still cost time).\n",
    ]
    if report["comparisons"]:
        parts.append("## Headline comparisons\n")
        parts += [f"- {k}: {v:.3f}" for k, v in report["comparisons"].items()]
        parts.append("")
    by_category = category_table(report["drafters"])
    if by_category:
        parts += ["## MAL by task category\n", by_category, "", f"![MAL by category]({CATEGORY_PLOT})", ""]
    parts.append(paper_markdown(report))
    parts += ["## Drafters\n"] + [
        f"- **{e['name']}**: {e['description']}"
        + (f"; {training_text(e['training'])}" if e.get("training") else "")
        + f" (`{e['drafter']}`)"
        for e in report["drafters"]
    ]
    parts += ["", "![MAL vs MACs](mal_vs_macs.png)", "", "![acceptance by position](acceptance_by_position.png)", ""]
    return "\n".join(parts)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(entries: list[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        ax.scatter(e["drafter_macs_per_token"], e["mean_accepted_length"])
        ax.annotate(
            e["name"],
            (e["drafter_macs_per_token"], e["mean_accepted_length"]),
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set(
        xlabel="drafter MACs per token (nonzero weights)", ylabel="mean accepted length", title="MAL vs drafter cost"
    )
    ax.grid(alpha=0.3)
    scatter = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        acc = e["per_position_acceptance"] or []
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=e["name"])
    ax.set(xlabel="draft position", ylabel="P(accepted)", title="acceptance by position", ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    lines = _png(fig)
    plt.close(fig)
    out = {"mal_vs_macs.png": scatter, "acceptance_by_position.png": lines}
    if len(category_names(entries)) > 1:
        out[CATEGORY_PLOT] = category_plot(entries)
    return out


def category_plot(entries: list[dict[str, Any]]) -> bytes:
    """Grouped bars: one group per category, one bar per drafter (its MAL on that category)."""
    import matplotlib.pyplot as plt

    names = category_names(entries)
    width = 0.8 / max(1, len(entries))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    for i, e in enumerate(entries):
        mals = [(e["categories"].get(n) or {}).get("mean_accepted_length") or 0.0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], mals, width, label=e["name"])
    ax.set_xticks([x + width * (len(entries) - 1) / 2 for x in range(len(names))], names)
    ax.set(ylabel="mean accepted length", title="MAL by task category")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    data = _png(fig)
    plt.close(fig)
    return data


def write_pipeline_report(config: PipelineConfig, reports: dict[str, dict[str, Any]], out_dir: str) -> dict[str, Any]:
    from sd2_ray.pipeline.chain import FINETUNED

    entries = drafter_entries(reports, {name: training_of(config, name) for name in reports if name in FINETUNED})
    first = next(iter(reports.values()))
    report = {
        "target": first.get("target"),
        "num_speculative_tokens": config.num_speculative_tokens,
        "num_prompts": first.get("num_prompts"),
        "target_macs_per_token": first.get("target_macs_per_token"),
        "temperature": first.get("temperature"),
        "baseline_tokens_per_second": first.get("baseline_tokens_per_second"),
        "drafters": entries,
        "comparisons": comparisons(entries),
    }
    report["paper_comparison"] = paper_comparison(report)
    storage.write_json(storage.join(out_dir, "report.json"), report)
    storage.write_text(storage.join(out_dir, "report.md"), render_markdown(report))
    for name, data in plots(entries).items():
        storage.write_bytes(storage.join(out_dir, name), data)
    return {**report, "table": markdown_table(entries)}
