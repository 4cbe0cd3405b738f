"""Fidelity to the paper, over seeds: the tiny pipeline's SD² drafter against its baselines.

For each seed the pipeline runs through its CLI (what users run) with ``prune.seed``,
``layer_prune.seed`` and ``finetune.seed`` set to the seed (pruning calibration sample and
fine-tuning data order change), at 50 % unstructured sparsity (the config's), at 2:4 and at 70 %
unstructured; ``drop_layers: auto`` re-matches the layer baseline to each variant's MACs. Every
ratio has its baseline measured in the same run, on the same prompts and K:

    sd2_over_layer_pruned     SD² MAL / layer-pruned-sd MAL at equal MACs
    sd2_over_sparse_sft       SD² MAL / sparse-sft MAL (the same sparse drafter fine-tuned on references)
    sd2_mal_drop_vs_dense_sd  1 - SD² MAL / dense-sd MAL
    sd2_mac_cut_vs_dense_sd   1 - SD² MACs / dense-sd MACs

The mechanism: the self-distilled fine-tune data covers only the ``--seen`` task
categories (``distill.categories``), the eval covers every kit category. Per seed, the MAL over
the seen and over the unseen categories (committed tokens / target passes, summed over the
group's categories) gives

    sd2_over_layer_pruned_seen / _unseen         SD² / layer-pruned-sd MAL at equal MACs
    dense_sd_over_layer_pruned_seen / _unseen    dense-sd / layer-pruned-sd MAL
    sd2_over_dense_sd_seen / _unseen             SD² / dense-sd MAL

The paper's argument is that sparsity keeps what the drafter learned in pretraining where
dropping layers loses it, so the SD² ratio should be higher on the unseen categories.
``--seen all`` distils every category (no unseen group).

Distillation is greedy (the same rows for every seed), so the target distils once, in the first
run; later runs get a copy of that ``distilled/`` (with its manifest), which ``sd2 run`` skips.
The dense-sd drafter does not depend on the sparsity, so a variant run reuses the same seed's
50 % run's dense-sd (model and eval) the same way. Reruns resume: complete runs are read back.

    python bench/bench_fidelity.py [--seeds 3] [--json FILE] [--out ABS_DIR] [--variants 50,2:4,70]
                                   [--seen code,rag,math_reasoning | all]
                                   [key=value ...]   (overrides passed to every `sd2 run`)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DRAFTERS = ["dense-sd", "layer-pruned-sd", "sd2", "sparse-sft"]
FEATURE_HEADS = ["eagle", "fspad"]  # --feature-heads: the target's feature heads, same budget
SEEN = "code,rag,math_reasoning"  # the categories the fine-tune sees by default; the kit has six
EVAL_PROMPTS = "eval.max_prompts=96"  # every kit eval prompt: 16 per category
GROUP_RATIOS = {  # JSON key prefix: (numerator drafter, denominator drafter)
    "sd2_over_layer_pruned": ("sd2", "layer-pruned-sd"),
    "dense_sd_over_layer_pruned": ("dense-sd", "layer-pruned-sd"),
    "sd2_over_dense_sd": ("sd2", "dense-sd"),
}
VARIANTS = {  # name: (JSON key suffix, overrides)
    "50": ("", []),
    "2:4": ("_2of4", ["prune.pattern=2:4"]),
    "70": ("_70pct", ["prune.sparsity=0.7"]),
}
RATIOS = {  # JSON key: report.json comparisons key
    "sd2_over_layer_pruned": "sd2_mal_over_layer_pruned",
    "sd2_over_sparse_sft": "sd2_mal_over_sparse_sft",
    "sd2_mal_drop_vs_dense_sd": "sd2_mal_drop_vs_dense_sd",
    "sd2_mac_cut_vs_dense_sd": "sd2_macs_reduction_vs_dense_sd",
}
# The goals, for the default (50 %) variant: (test on the mean, on every seed, in words)
GOALS = {
    "fspad_over_eagle": (lambda m: m >= 1.0, lambda v: v >= 1.0, ">= 1.0 on every seed"),
    "best_head_mal_per_mac_over_sd2": (lambda m: m > 1.0, None, "> 1.0"),
    "sd2_over_layer_pruned": (lambda m: m >= 1.2, lambda v: v > 1.0, ">= 1.2x, every seed > 1.0"),
    "sd2_mal_drop_vs_dense_sd": (lambda m: m <= 0.15, None, "<= 15 %"),
    "sd2_mac_cut_vs_dense_sd": (lambda m: m >= 0.35, None, ">= 35 %"),
    "sd2_over_sparse_sft": (lambda m: m >= 1.3, None, ">= 1.3x"),
    "sd2_over_layer_pruned_unseen": (lambda m: m >= 1.2, lambda v: v > 1.0, ">= 1.2x, every seed > 1.0"),
}


def run_dir(root: str, variant: str, seed: int) -> str:
    return os.path.join(root, f"v{variant.replace(':', 'of')}", f"seed-{seed}")


def copy_complete(src: str, dest: str) -> None:
    """Copy a finished stage output (manifest included) so `sd2 run` skips that stage."""
    if os.path.isdir(src) and not os.path.exists(dest):
        shutil.copytree(src, dest)


def seed_inputs(root: str, variant: str, seed: int, first: str | None) -> None:
    out = run_dir(root, variant, seed)
    os.makedirs(out, exist_ok=True)
    if first is not None:
        copy_complete(os.path.join(first, "distilled"), os.path.join(out, "distilled"))
    base = run_dir(root, "50", seed)
    if variant != "50" and os.path.isdir(base):
        for part in ("drafters/dense-sd", "eval/dense-sd"):
            copy_complete(os.path.join(base, part), os.path.join(out, part))
        src, dest = os.path.join(base, "eval", "target-only.json"), os.path.join(out, "eval", "target-only.json")
        if os.path.isfile(src) and not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(src, dest)


def seen_overrides(seen: list[str] | None) -> list[str]:
    """The `sd2 run` overrides that distil only the seen categories (none: every category)."""
    return [f"distill.categories=[{','.join(seen)}]"] if seen else []


def group_mal(drafter: dict, names: list[str]) -> float | None:
    """MAL over several categories of one drafter's report entry: committed tokens / target
    passes, summed over them (a category's committed tokens are its MAL x its passes)."""
    cats = [drafter["categories"][n] for n in names if n in drafter.get("categories", {})]
    passes = sum(c["target_passes"] for c in cats)
    return sum(c["mean_accepted_length"] * c["target_passes"] for c in cats) / passes if passes else None


def group_ratios(report: dict, seen: list[str] | None) -> dict[str, float]:
    """{``<ratio>_seen`` / ``<ratio>_unseen``: value} of one run (only the groups that exist)."""
    by = {d["name"]: d for d in report["drafters"]}
    names = sorted({n for d in by.values() for n in d.get("categories", {})})
    groups = {"seen": [n for n in names if seen is None or n in seen]}
    groups["unseen"] = [n for n in names if n not in groups["seen"]]
    out = {}
    for key, (top, bottom) in GROUP_RATIOS.items():
        for group, members in groups.items():
            if top in by and bottom in by and members:
                a, b = group_mal(by[top], members), group_mal(by[bottom], members)
                if a is not None and b:
                    out[f"{key}_{group}"] = a / b
    return out


def head_ratios(report: dict) -> dict[str, float]:
    """The feature heads against each other and against SD²: MAL ratios, and MAL per drafting
    MAC (each head's cost includes the target's LM head) of the better head over SD²'s."""
    by = {d["name"]: d for d in report["drafters"]}
    if not all(n in by for n in ("eagle", "fspad", "sd2")):
        return {}
    mal = {n: by[n]["mean_accepted_length"] for n in ("eagle", "fspad", "sd2")}
    per_mac = {n: mal[n] / by[n]["drafter_macs_per_token"] for n in mal}
    best = "fspad" if mal["fspad"] >= mal["eagle"] else "eagle"
    return {
        "fspad_over_eagle": mal["fspad"] / mal["eagle"],
        "fspad_over_sd2": mal["fspad"] / mal["sd2"],
        "eagle_over_sd2": mal["eagle"] / mal["sd2"],
        "best_head_mal_per_mac_over_sd2": per_mac[best] / per_mac["sd2"],
    }


def run_pipeline(config: str, out: str, seed: int, variant: str, overrides: list[str], log_path: str) -> dict:
    """One `sd2 run`; returns its report.json plus wall and CPU seconds."""
    report_path = os.path.join(out, "report", "report.json")
    if _complete(out) and os.path.isfile(report_path):
        return {**json.load(open(report_path)), "wall_s": None, "cpu_s": None, "layer_drop": _layer_drop(out)}
    cmd = [
        sys.executable,
        "-m",
        "sd2_ray.cli",
        "run",
        "--config",
        config,
        "--output",
        out,
        f"prune.seed={seed}",
        f"layer_prune.seed={seed}",
        f"finetune.seed={seed}",
        "serve_smoke=false",
        *VARIANTS[variant][1],
        *overrides,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    print(f"[fidelity] variant {variant}, seed {seed}: {' '.join(cmd[2:])}", flush=True)
    before, started = _children_cpu(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"sd2 run failed (exit {proc.returncode}); log: {log_path}")
    return {
        **json.load(open(report_path)),
        "wall_s": round(time.time() - started, 1),
        "cpu_s": round(_children_cpu() - before, 1),
        "layer_drop": _layer_drop(out),
    }


def _layer_drop(out: str) -> int | None:
    try:
        return len(json.load(open(os.path.join(out, "pruned", "layers", "manifest.json")))["dropped_blocks"])
    except (OSError, ValueError, KeyError):
        return None


def _complete(out: str) -> bool:
    try:
        return json.load(open(os.path.join(out, "manifest.json"))).get("status") == "complete"
    except (OSError, ValueError):
        return False


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarise(reports: dict[str, list[dict]], seen: list[str] | None = None) -> dict[str, dict]:
    """{JSON key: {"mean", "per_seed"}} for every ratio of every variant, the seen/unseen
    group ratios included."""
    out = {}
    for variant, runs in reports.items():
        suffix = VARIANTS[variant][0]
        for key, source in RATIOS.items():
            values = [r["comparisons"][source] for r in runs if source in r["comparisons"]]
            if values:
                out[key + suffix] = {"mean": statistics.fmean(values), "per_seed": values}
        per_run = [{**group_ratios(r, seen), **head_ratios(r)} for r in runs]
        for key in sorted({k for g in per_run for k in g}):
            values = [g[key] for g in per_run if key in g]
            out[key + suffix] = {"mean": statistics.fmean(values), "per_seed": values}
    return out


def mal_table(reports: dict[str, list[dict]]) -> list[str]:
    lines = [
        f"{'variant':<8} {'seed':>4} {'dense-sd':>9} {'layer-pr':>9} {'sd2':>7} {'sparse-sft':>10} "
        f"{'sd2 MACs':>9} {'layer MACs':>10} {'drop':>5} {'wall s':>7} {'CPU s':>7}"
    ]
    for variant, runs in reports.items():
        for seed, r in enumerate(runs):
            by = {d["name"]: d for d in r["drafters"]}
            mal = lambda n, by=by: by[n]["mean_accepted_length"] if n in by else float("nan")  # noqa: E731
            macs = lambda n, by=by: by[n]["drafter_macs_per_token"] if n in by else 0  # noqa: E731
            drop = r["layer_drop"] if r["layer_drop"] is not None else "?"
            lines.append(
                f"{variant:<8} {seed:>4} {mal('dense-sd'):>9.3f} {mal('layer-pruned-sd'):>9.3f} "
                f"{mal('sd2'):>7.3f} {mal('sparse-sft'):>10.3f} {macs('sd2'):>9,} "
                f"{macs('layer-pruned-sd'):>10,} {drop!s:>5} {r['wall_s'] or 0:>7.0f} {r['cpu_s'] or 0:>7.0f}"
            )
    return lines


def category_table(reports: dict[str, list[dict]], seen: list[str] | None) -> list[str]:
    """Each run's MAL per category and drafter; unseen categories are starred."""
    lines = []
    for variant, runs in reports.items():
        for seed, r in enumerate(runs):
            names = sorted({n for d in r["drafters"] for n in d.get("categories", {})})
            head = " ".join(f"{n[:12] + ('*' if seen and n not in seen else ''):>13}" for n in names)
            lines.append(f"{'variant ' + variant + ' seed ' + str(seed):<22} {head}")
            for d in r["drafters"]:
                cells = " ".join(
                    f"{d['categories'].get(n, {}).get('mean_accepted_length', float('nan')):>13.3f}" for n in names
                )
                lines.append(f"  {d['name']:<20} {cells}")
    return lines + (["(* not in the fine-tune data)"] if seen else [])


def ratio_table(summary: dict[str, dict]) -> list[str]:
    lines = [f"{'ratio':<42} {'mean':>7}  {'per seed':<26} {'goal (50 %)':<26} met"]
    for key, value in summary.items():
        seeds = ", ".join(f"{v:.3f}" for v in value["per_seed"])
        goal, met = GOALS.get(key), ""
        if goal is not None:
            on_mean, on_each, words = goal
            ok = on_mean(value["mean"]) and (on_each is None or all(on_each(v) for v in value["per_seed"]))
            goal, met = words, "yes" if ok else "NO"
        lines.append(f"{key:<42} {value['mean']:>7.3f}  {seeds:<26} {goal or '':<26} {met}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write the ratios as JSON here")
    parser.add_argument(
        "--out",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sd2-bench-fidelity"),
        help="absolute directory for the runs (reruns resume here)",
    )
    parser.add_argument("--config", default=os.path.join(ROOT, "jobs", "configs", "tiny.yaml"))
    parser.add_argument("--variants", default="50,2:4,70", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--seen",
        default=SEEN,
        help="comma list of the categories the fine-tune data covers (distill.categories), or 'all'",
    )
    parser.add_argument(
        "--feature-heads",
        action="store_true",
        help="also train and evaluate the eagle and fspad feature heads (fspad_over_eagle, fspad_over_sd2)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every `sd2 run`")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        print(f"--variants: unknown {unknown}" if unknown else "--seeds: must be >= 1", file=sys.stderr)
        sys.exit(2)
    seen = None if args.seen.strip() == "all" else [c.strip() for c in args.seen.split(",") if c.strip()]
    drafters = DRAFTERS + (FEATURE_HEADS if args.feature_heads else [])
    overrides = [f"drafters=[{','.join(drafters)}]", EVAL_PROMPTS, *seen_overrides(seen), *args.overrides]
    root = os.path.abspath(args.out)  # Ray Train workers run elsewhere: never a relative output
    order = ["50"] + [v for v in variants if v != "50"] if "50" in variants else variants
    reports: dict[str, list[dict]] = {v: [] for v in order}
    first = None
    for seed in range(args.seeds):
        for variant in order:
            out = run_dir(root, variant, seed)
            seed_inputs(root, variant, seed, first)
            reports[variant].append(
                run_pipeline(
                    args.config,
                    out,
                    seed,
                    variant,
                    overrides,
                    os.path.join(root, f"log-v{variant.replace(':', 'of')}-s{seed}.txt"),
                )
            )
            first = first or out
    summary = summarise(reports, seen)
    print("\nMAL per drafter (same prompts and K in each run):")
    print("\n".join(mal_table(reports)))
    print(f"\nMAL per category (fine-tune saw: {', '.join(seen) if seen else 'all'}):")
    print("\n".join(category_table(reports, seen)))
    print(f"\nSD² ratios over {args.seeds} seed(s) (baselines measured in the same runs):")
    print("\n".join(ratio_table(summary)))
    total_cpu = sum(r["cpu_s"] or 0 for runs in reports.values() for r in runs)
    print(f"\nruns under {root}; CPU seconds (sd2 run processes, reaped children): {total_cpu:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
