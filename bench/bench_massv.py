"""MASSV on the model kit: multimodal drafters for the kit's vision-language target, with and
without SD²'s sparsity, against a text-only drafter and the paper's control.

Every drafter is made by the real stages: `sd2 distill` has the kit VLM answer the scene
questions (self-distilled rows with images), `sd2 prune` makes the sparse LM (SparseGPT 50 %,
calibrated on those rows), `sd2 finetune` runs MASSV's phases (a `massv` section: phase 1 the
projector on image–caption pairs, phase 2 projector + LM on the distilled rows, masks held), and
`sd2 eval`'s code decodes the held-out scenes losslessly with images. Per seed (projector init
and data order):

- text-only: the kit drafter as it is, shown the prompt without the image (placeholders only);
- control:   the kit drafter tuned on the same distilled answers without the images;
- massv:     the kit drafter + the target's vision tower + a projector, phases 1 and 2;
- massv-sd2: the same from the 50 %-pruned drafter, its masks held through phase 2.

Prints MAL and drafting MACs per drafter (mean over seeds, and each seed), per-image vision
MACs (the tower once per image, shared; each side's projector), and the issue's goals.

Each seed is `sd2 massv --config jobs/configs/massv.yaml` with that seed and its own output.

    python bench/bench_massv.py [--seeds 3] [--out /tmp/massv-bench] [--k 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DRAFTERS = ("text-only", "control", "massv", "massv-sd2")
CONFIG = os.path.join(ROOT, "jobs", "configs", "massv.yaml")


def run_seed(out: str, seed: int, k: int) -> dict:
    """`sd2 massv --config jobs/configs/massv.yaml` for one seed: its report."""
    from sd2_ray.vision.recipe import run_massv
    from sd2_ray.vision.recipe_config import MassvRunConfig

    overrides = {"output": os.path.join(out, f"seed{seed}"), "seed": seed, "num_speculative_tokens": k}
    return run_massv(MassvRunConfig.load(CONFIG, overrides=overrides))


def summary(results: dict[str, list[dict]]) -> dict:
    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[name])

    mal = {n: mean(n, "mean_accepted_length") for n in results}
    macs = {n: mean(n, "drafter_macs_per_token") for n in results}
    goals = {
        "massv_over_text_only": mal["massv"] / mal["text-only"],
        "massv_over_control": mal["massv"] / mal["control"],
        "massv_sd2_over_massv_mal": mal["massv-sd2"] / mal["massv"],
        "massv_sd2_mac_cut": 1 - macs["massv-sd2"] / macs["massv"],
    }
    goals["met"] = {
        "massv >= 1.3x text-only": goals["massv_over_text_only"] >= 1.3,
        "massv > control": goals["massv_over_control"] > 1.0,
        "massv-sd2 within 15% of massv": goals["massv_sd2_over_massv_mal"] >= 0.85,
        "massv-sd2 >= 35% fewer MACs": goals["massv_sd2_mac_cut"] >= 0.35,
    }
    return {"mal": mal, "macs": macs, "goals": goals}


def print_table(results: dict[str, list[dict]], summ: dict, vision: dict) -> None:
    print(f"\n{'drafter':<11} {'MAL mean':>9} {'per seed':<26} {'drafting MACs/token':>20}")
    for name in DRAFTERS:
        seeds = ", ".join(f"{r['mean_accepted_length']:.3f}" for r in results[name])
        print(f"{name:<11} {summ['mal'][name]:>9.3f} {seeds:<26} {summ['macs'][name]:>20,.0f}")
    print(f"\nper image (counted once per image): {json.dumps(vision)}")
    g = summ["goals"]
    print(
        f"massv / text-only {g['massv_over_text_only']:.3f}x; massv / control {g['massv_over_control']:.3f}x; "
        f"massv-sd2 / massv MAL {g['massv_sd2_over_massv_mal']:.3f} at {100 * g['massv_sd2_mac_cut']:.1f}% fewer MACs"
    )
    for goal, ok in g["met"].items():
        print(f"  {'met' if ok else 'NOT met'}: {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="/tmp/massv-bench")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    started = time.time()
    reports = [run_seed(args.out, seed, args.k) for seed in range(args.seeds)]
    results = {n: [r["drafters"][n] for r in reports] for n in DRAFTERS}
    vision = {n: results[n][0]["vision"] for n in DRAFTERS}
    summ = summary(results)
    print_table(results, summ, vision)
    print(f"\n{args.seeds} seeds, K {args.k}; {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summ, "vision": vision, "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
