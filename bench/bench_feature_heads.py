"""Ablation of the feature heads on the model kit: EAGLE, FSPAD, and each FSPAD component alone.

Every head is trained by the real `sd2 finetune` (a `feature_head` section: the kit target's
features streamed into Ray Train + DeepSpeed) on the same self-distilled rows with the same budget
(the tiny run's finetune section), once per seed, then decoded by `sd2 eval`'s code on the same
held-out kit prompts and K. An SD² drafter (given with --sd2) is evaluated on the same prompts as
the reference. Prints MAL and drafting MACs per variant and seed, the ratios over EAGLE, and
FSPAD against SD² in MAL and in MAL per drafting MAC.

    python bench/bench_feature_heads.py --distilled out/tiny/distilled --sd2 out/tiny/drafters/sd2 \\
        [--seeds 3] [--variants eagle,fspad,fspad-sampling,fspad-pad] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VARIANTS = "eagle,fspad,fspad-sampling,fspad-pad"


def budget() -> dict:
    """The tiny run's finetune section: every head trains with the drafters' budget."""
    from sd2_ray.config import read_yaml

    section = dict(read_yaml(os.path.join(ROOT, "jobs", "configs", "tiny.yaml"))["finetune"])
    return section


def train(distilled: str, target: str, out: str, variant: str, seed: int, head: dict) -> str:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune

    config = FinetuneConfig(
        model=target, data=distilled, output=out, seed=seed, feature_head={**head, "variant": variant}, **budget()
    )
    run_finetune(config)
    return out


def evaluate(target: str, drafter: str, rows: list[dict], args) -> dict:
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair

    settings = EvalSettings(max_new_tokens=48, batch_size=8, measure_baseline=False)
    report = evaluate_pair(target, drafter, rows, args.k, settings, progress=False)
    return {"mal": report["mean_accepted_length"], "macs": report["drafter_macs_per_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distilled", required=True, help="self-distilled rows (a `sd2 distill` output)")
    parser.add_argument("--sd2", default=None, help="an SD² drafter dir to compare with (e.g. out/tiny/drafters/sd2)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--prompts", type=int, default=64, help="held-out kit prompts evaluated")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sd2-bench-heads"))
    parser.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="key=value",
        help="a feature_head setting for every variant, e.g. intermediate_size=1536 (a wider EAGLE at FSPAD's MACs)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows

    paths = kit_paths(ensure_kit())
    rows = read_rows(paths["eval_prompts"])[: args.prompts]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    head = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.head)}
    distilled, root = os.path.abspath(args.distilled), os.path.abspath(args.out)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in range(args.seeds):
        for variant in variants:
            out = os.path.join(root, f"{variant}-seed{seed}")
            results[variant].append(
                evaluate(paths["target"], train(distilled, paths["target"], out, variant, seed, head), rows, args)
            )
            print(f"seed {seed} {variant:15s} MAL {results[variant][-1]['mal']:.3f}", flush=True)
    sd2 = evaluate(paths["target"], os.path.abspath(args.sd2), rows, args) if args.sd2 else None
    summary = summarise(results, sd2)
    print("\n".join(table(results, sd2, summary)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "sd2": sd2, "summary": summary}, f, indent=2)


def summarise(results: dict[str, list[dict]], sd2: dict | None) -> dict[str, dict]:
    """{ratio: {mean, per_seed}}: each variant over EAGLE; FSPAD over SD² in MAL and per MAC."""
    out = {}
    eagle = results.get("eagle", [])
    for variant, runs in results.items():
        if variant != "eagle" and len(eagle) == len(runs):
            values = [r["mal"] / e["mal"] for r, e in zip(runs, eagle, strict=True)]
            out[f"{variant}_over_eagle"] = {"mean": statistics.fmean(values), "per_seed": values}
    if sd2 is not None:
        for variant in ("eagle", "fspad"):
            runs = results.get(variant, [])
            if runs:
                mal = [r["mal"] / sd2["mal"] for r in runs]
                per_mac = [(r["mal"] / r["macs"]) / (sd2["mal"] / sd2["macs"]) for r in runs]
                out[f"{variant}_over_sd2"] = {"mean": statistics.fmean(mal), "per_seed": mal}
                out[f"{variant}_mal_per_mac_over_sd2"] = {"mean": statistics.fmean(per_mac), "per_seed": per_mac}
    return out


def table(results: dict[str, list[dict]], sd2: dict | None, summary: dict[str, dict]) -> list[str]:
    lines = [f"{'drafter':<16} {'MAL mean':>8}  {'per seed':<24} {'MACs/token':>11}"]
    for variant, runs in results.items():
        seeds = ", ".join(f"{r['mal']:.3f}" for r in runs)
        lines.append(
            f"{variant:<16} {statistics.fmean(r['mal'] for r in runs):>8.3f}  {seeds:<24} {runs[0]['macs']:>11,}"
        )
    if sd2 is not None:
        lines.append(f"{'sd2 (reference)':<16} {sd2['mal']:>8.3f}  {'':<24} {sd2['macs']:>11,}")
    lines += ["", f"{'ratio':<32} {'mean':>7}  per seed"]
    for key, value in summary.items():
        lines.append(f"{key:<32} {value['mean']:>7.3f}  {', '.join(f'{v:.3f}' for v in value['per_seed'])}")
    return lines


if __name__ == "__main__":
    main()
