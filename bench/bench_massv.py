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
# the budget of every phase (the kit's rows are short: a step is a fraction of a second)
PHASE1 = {"max_steps": 200, "epochs": 4, "lr": 5e-3}
PHASE2 = {"epochs": 3, "lr": 2e-3}
COMMON = {"workers": 1, "batch_size": 16, "seq_len": 128, "eval_every": 50, "eval_rows": 64}


def distill(kit: dict, out: str) -> str:
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.job import run_distill

    config = DistillConfig(
        target=kit["vlm"],
        prompts=kit["vision_train_prompts"],
        output=out,
        engine="transformers",
        actors=2,
        batch_size=32,
        max_new_tokens=64,
    )
    run_distill(config)
    return out


def prune(kit: dict, calibration: str, out: str) -> str:
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import run_prune

    run_prune(
        PruneConfig(
            model=kit["drafter"], calibration=calibration, output=out, method="sparsegpt", sparsity=0.5, seq_len=128
        )
    )
    return out


def finetune(model: str, data: str, out: str, seed: int, massv: dict, budget: dict) -> str:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune

    run_finetune(FinetuneConfig(model=model, data=data, output=out, seed=seed, massv=massv, **COMMON, **budget))
    return out


def drafters_of_seed(kit: dict, distilled: str, pruned: str, out: str, seed: int) -> dict[str, str]:
    """{drafter name: model dir} of one seed."""
    from sd2_ray.vision.model import save_text_lm

    target = kit["vlm"]
    captions = kit["vision_captions"]
    made = {"text-only": kit["drafter"]}
    for name, text in (("massv", kit["drafter"]), ("massv-sd2", pruned)):
        base = os.path.join(out, f"seed{seed}", name)
        phase1 = finetune(
            text, captions, base + "-p1", seed, {"phase": "projector", "target": target, "seed": seed}, PHASE1
        )
        made[name] = finetune(phase1, distilled, base, seed, {"phase": "instruct"}, PHASE2)
    control = os.path.join(out, f"seed{seed}", "control")
    finetune(
        kit["drafter"],
        distilled,
        control + "-llava",
        seed,
        {"phase": "instruct", "target": target, "images": False},
        PHASE2,
    )
    made["control"] = control if os.path.isdir(control) else save_text_lm(control + "-llava", control)
    return made


def evaluate(target: str, drafter: str, rows: list[dict], k: int) -> dict:
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair

    settings = EvalSettings(max_new_tokens=64, batch_size=16, measure_baseline=False)
    return evaluate_pair(target, drafter, rows, k, settings, progress=False)


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

    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_jsonl

    started = time.time()
    kit = kit_paths(ensure_kit())
    distilled = distill(kit, os.path.join(args.out, "distilled"))
    pruned = prune(kit, distilled, os.path.join(args.out, "pruned"))
    rows = read_jsonl(kit["vision_eval_prompts"], [])
    results: dict[str, list[dict]] = {n: [] for n in DRAFTERS}
    vision: dict = {}
    for seed in range(args.seeds):
        made = drafters_of_seed(kit, distilled, pruned, args.out, seed)
        for name in DRAFTERS:
            report = evaluate(kit["vlm"], made[name], rows, args.k)
            results[name].append(report)
            vision[name] = report.get("vision_macs_per_image", {})
            print(f"seed {seed} {name}: MAL {report['mean_accepted_length']:.3f}", flush=True)
    summ = summary(results)
    print_table(results, summ, vision)
    print(f"\n{args.seeds} seeds, K {args.k}, {len(rows)} held-out scenes; {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summ, "vision": vision, "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
