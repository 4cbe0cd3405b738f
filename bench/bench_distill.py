"""Distillation throughput: Ray Data actor pool (1 vs 2 actors) vs a plain single-process batched
``generate`` loop over the same prompts, on the model kit's target.

    python bench/bench_distill.py [--rows 192] [--max-new-tokens 48] [--batch-size 16]

Fairness on a 2-core box: each actor gets 1 torch thread; the baseline process gets 2. Steady
throughput counts rows after the first shard/batch (model loading and actor start excluded);
wall includes everything after ``ray.init``. Prints a table and writes bench_distill.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL_ACTORS, GOAL_BASELINE = 1.8, 1.0


def load_requests(target: str, rows: list[dict], batch_size: int):
    from sd2_ray.distill import core
    from sd2_ray.models.io import load_tokenizer

    requests, skipped = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, batch_size)
    assert not skipped, skipped
    return requests


def steady(marks: list[tuple[float, int, int]], started: float) -> dict:
    """Rates after the first completion (warm), plus wall from ``started``; marks = (t, rows, tokens)."""
    marks.sort()
    (t0, _, _), t_end = marks[0], marks[-1][0]
    rows_after = sum(m[1] for m in marks[1:])
    tokens_after = sum(m[2] for m in marks[1:])
    span = max(t_end - t0, 1e-9)
    return {"rows_per_s": rows_after / span, "tokens_per_s": tokens_after / span,
            "wall_s": t_end - started, "rows": sum(m[1] for m in marks), "tokens": sum(m[2] for m in marks)}


def run_baseline(target: str, requests, max_new_tokens: int, batch_size: int, threads: int) -> dict:
    from sd2_ray.distill.engines import TransformersEngine

    started = time.perf_counter()
    engine = TransformersEngine(target, torch_threads=threads)
    marks = []
    for lo in range(0, len(requests), batch_size):
        out = engine.generate([r.prompt_ids for r in requests[lo:lo + batch_size]], max_new_tokens)
        marks.append((time.perf_counter(), len(out), sum(len(ids) for ids, _ in out)))
    return steady(marks, started)


def run_ray(target: str, requests, max_new_tokens: int, batch_size: int, actors: int) -> dict:
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.pipeline import generate_shards

    config = DistillConfig(target=target, prompts="-", output="-", actors=actors, batch_size=batch_size,
                           shard_size=batch_size, max_new_tokens=max_new_tokens, torch_threads=1)
    marks = []

    def on_shard(shard, answered):
        marks.append((time.perf_counter(), len(answered), sum(g.response_tokens for _, g in answered)))

    eos = target_eos_ids(target)
    started = time.perf_counter()
    generate_shards(requests, target, config, eos, on_shard)
    return steady(marks, started)


def target_eos_ids(target: str) -> list[int]:
    from sd2_ray.distill.job import load_target_info

    return load_target_info(target, False)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    ensure_ray(num_cpus=2, attempts=4)  # first: a busy machine can make the local start slow
    kit = ensure_kit()
    target = kit_paths(kit)["target"]
    rows = read_rows(kit_paths(kit)["train_prompts"])[:args.rows]
    requests = load_requests(target, rows, args.batch_size)
    results = {
        "baseline_1proc_2threads": run_baseline(target, requests, args.max_new_tokens, args.batch_size, 2),
        "ray_1_actor": run_ray(target, requests, args.max_new_tokens, args.batch_size, 1),
        "ray_2_actors": run_ray(target, requests, args.max_new_tokens, args.batch_size, 2),
    }
    import ray

    ray.shutdown()
    print_table(results, args)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_distill.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


def print_table(results: dict, args) -> None:
    print(f"\nrows={args.rows} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
          f"(kit target, greedy, CPU)")
    print(f"{'run':26s} {'rows/s':>8s} {'tokens/s':>9s} {'wall s':>7s} {'tokens':>7s}")
    for name, r in results.items():
        print(f"{name:26s} {r['rows_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['wall_s']:7.1f} {r['tokens']:7d}")
    one, two, base = results["ray_1_actor"], results["ray_2_actors"], results["baseline_1proc_2threads"]
    ratios = [("2 actors / 1 actor (steady tokens/s)", two["tokens_per_s"] / one["tokens_per_s"], GOAL_ACTORS),
              ("2 actors / baseline (steady tokens/s)", two["tokens_per_s"] / base["tokens_per_s"], GOAL_BASELINE),
              ("2 actors / 1 actor (wall)", one["wall_s"] / two["wall_s"], None),
              ("2 actors / baseline (wall)", base["wall_s"] / two["wall_s"], None)]
    for label, ratio, goal in ratios:
        verdict = "" if goal is None else (f"goal >= {goal}: " + ("met" if ratio >= goal else "NOT met"))
        print(f"{label:40s} {ratio:5.2f}x  {verdict}")


if __name__ == "__main__":
    main()
