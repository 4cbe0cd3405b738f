"""Distillation throughput: Ray Data actor pool (1 vs 2 actors) vs a plain single-process batched
``generate`` loop over the same prompts, on the model kit's target; and the cost of storing the
target's top-k log-probs (2 actors, ``logprobs_top_k`` 0 vs K, alternated ``--repeats`` times in
the same run, best steady rate of each kept), with the stored bytes per response token, and the
same comparison inside one engine actor's callable in this process, timed in CPU seconds
(``time.process_time``: far less sensitive than wall time to other load on the machine).

    python bench/bench_distill.py [--rows 192] [--max-new-tokens 48] [--batch-size 16] [--topk 20]
                                  [--repeats 2] [--topk-only]

Fairness on a 2-core box: each actor gets 1 torch thread; the baseline process gets 2. Steady
throughput counts rows after the first shard/batch (model loading and actor start excluded);
wall includes everything after ``ray.init``. Prints a table and writes bench_distill.json.

``--engine vllm``: the ``ray.data.llm`` vLLM pipeline (the distill job's path, one engine actor)
against a bare ``vllm.LLM.generate`` over the same prompt ids in this process, both greedy,
eager mode, float32, the rows repeated ``--repeat`` times (new indices) so that generation, not
engine start-up, fills the run. Steady tokens/s, engine start excluded: for the bare engine its
one ``generate`` call; for the pipeline the rows after its first in-flight window (Ray's vLLM
stage keeps 8 batches in flight, which finish together: counting from the first finished shard
would count a burst) up to the last. Tokens exclude the EOS on both sides. Goal: >= 0.8x.
Writes bench_distill_vllm.json.

    python bench/bench_distill.py --engine vllm [--rows 192] [--repeat 8] [--max-new-tokens 48] [--batch-size 16]
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
GOAL_TOPK_SLOWDOWN = 0.15  # storing top-20 may cost at most 15 % of steady tokens/s
GOAL_VLLM_PIPELINE = 0.8  # ray.data.llm pipeline / bare vllm.LLM.generate, steady tokens/s
VLLM_BATCHES_IN_FLIGHT = 8  # ray.data.llm's max_concurrent_batches default (Ray 2.60)


def load_requests(target: str, rows: list[dict], batch_size: int):
    from sd2_ray.distill import core
    from sd2_ray.models.io import load_tokenizer

    requests, skipped = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, batch_size)
    assert not skipped, skipped
    return requests


def steady(marks: list[tuple[float, int, int]], started: float, skip: int = 1) -> dict:
    """Rates after the first ``skip`` completions (warm), plus wall from ``started``; marks =
    (t, rows, tokens)."""
    marks.sort()
    (t0, _, _), t_end = marks[skip - 1], marks[-1][0]
    rows_after = sum(m[1] for m in marks[skip:])
    tokens_after = sum(m[2] for m in marks[skip:])
    span = max(t_end - t0, 1e-9)
    return {
        "rows_per_s": rows_after / span,
        "tokens_per_s": tokens_after / span,
        "wall_s": t_end - started,
        "rows": sum(m[1] for m in marks),
        "tokens": sum(m[2] for m in marks),
    }


def run_baseline(target: str, requests, max_new_tokens: int, batch_size: int, threads: int) -> dict:
    from sd2_ray.distill.engines import TransformersEngine

    started = time.perf_counter()
    engine = TransformersEngine(target, torch_threads=threads)
    marks = []
    for lo in range(0, len(requests), batch_size):
        out = engine.generate([r.prompt_ids for r in requests[lo : lo + batch_size]], max_new_tokens)
        marks.append((time.perf_counter(), len(out), sum(len(ids) for ids, _ in out)))
    return steady(marks, started)


def run_ray(
    target: str,
    requests,
    max_new_tokens: int,
    batch_size: int,
    actors: int,
    top_k: int = 0,
    engine: str = "transformers",
) -> dict:
    """The distill job's path: actor pool (or ray.data.llm's vLLM processor), shards handed back,
    each shard's table built as the job writes it (Parquet serialised in memory, so its size is
    measured, not the disk)."""
    from sd2_ray.distill import core
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.job import load_target_info
    from sd2_ray.distill.ray_data import generate_shards

    config = DistillConfig(
        target=target,
        prompts="-",
        output="-",
        actors=actors,
        batch_size=batch_size,
        shard_size=batch_size,
        max_new_tokens=max_new_tokens,
        torch_threads=1,
        logprobs_top_k=top_k,
        engine=engine,
    )
    marks, sizes = [], {"arrow_bytes": 0, "parquet_bytes": 0, "stored_tokens": 0}

    def on_shard(shard, answered):
        table = core.result_table([core.result_row(r, g, "generate", False) for r, g in answered], top_k)
        sizes["arrow_bytes"] += table.nbytes
        sizes["parquet_bytes"] += parquet_size(table)
        sizes["stored_tokens"] += sum(len(g.token_ids or []) for _, g in answered)
        marks.append((time.perf_counter(), len(answered), sum(g.response_tokens for _, g in answered)))

    _, eos, context = load_target_info(target, False)
    started, cpu = time.perf_counter(), time.process_time()
    generate_shards(requests, target, config, eos, on_shard, context=context)
    skip = VLLM_BATCHES_IN_FLIGHT if engine == "vllm" else 1
    return {**steady(marks, started, skip), **sizes, "driver_cpu_s": time.process_time() - cpu}


def run_udf_cpu(target: str, requests, max_new_tokens: int, batch_size: int, top_k: int) -> dict:
    """CPU seconds of one engine actor's callable (generation + result columns) over the rows."""
    from sd2_ray.distill.engines import TransformersBatchUDF

    settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": 1,
        "logprobs_top_k": top_k,
    }
    udf = TransformersBatchUDF(target, settings)
    cpu, tokens = time.process_time(), 0
    for lo in range(0, len(requests), batch_size):
        part = requests[lo : lo + batch_size]
        out = udf(
            {"index": [r.index for r in part], "shard": [0] * len(part), "prompt_ids": [r.prompt_ids for r in part]}
        )
        tokens += sum(out["response_tokens"])
    seconds = time.process_time() - cpu
    return {"top_k": top_k, "cpu_s": seconds, "tokens": tokens, "tokens_per_cpu_s": tokens / seconds}


def parquet_size(table) -> int:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)  # as storage.write_parquet writes shards
    return len(buf.getvalue())


def run_bare_vllm(target: str, requests, max_new_tokens: int, eos: list[int]) -> dict:
    """One ``vllm.LLM.generate`` over every prompt id list: the engine alone, no Ray. Timed from
    the call (engine start excluded), the settings the distill job gives vLLM on CPU."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=target, dtype="float32", enforce_eager=True, seed=0)
    ready = time.perf_counter()
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests],
        SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
        use_tqdm=False,
    )
    done = time.perf_counter()
    ids = [o.outputs[0].token_ids for o in out]
    tokens = sum(len(i) - (1 if i and i[-1] in eos else 0) for i in ids)
    llm.llm_engine.engine_core.shutdown()
    return {
        "rows_per_s": len(out) / (done - ready),
        "tokens_per_s": tokens / (done - ready),
        "wall_s": done - started,
        "rows": len(out),
        "tokens": tokens,
        "engine_start_s": ready - started,
    }


def main_vllm(args, target: str, requests) -> dict:
    """The ray.data.llm pipeline, then the bare engine (Ray shut down in between: 2 cores)."""
    import dataclasses

    from sd2_ray.distill.job import load_target_info

    n = len(requests)
    requests = [
        dataclasses.replace(r, index=i, shard=i // args.batch_size)
        for i, r in enumerate(requests[j % n] for j in range(n * args.repeat))
    ]
    results = {
        "ray_data_llm_1_actor": run_ray(target, requests, args.max_new_tokens, args.batch_size, 1, engine="vllm")
    }
    import ray

    ray.shutdown()
    results["bare_vllm_generate"] = run_bare_vllm(
        target, requests, args.max_new_tokens, load_target_info(target, False)[1]
    )
    print(
        f"\nrows={args.rows} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
        f"x {args.repeat} (kit target, vLLM CPU, float32, eager, greedy; wall s includes engine start)"
    )
    print(f"{'run':26s} {'rows/s':>8s} {'tokens/s':>9s} {'wall s':>7s} {'tokens':>7s}")
    for name, r in results.items():
        print(f"{name:26s} {r['rows_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['wall_s']:7.1f} {r['tokens']:7d}")
    ratio = results["ray_data_llm_1_actor"]["tokens_per_s"] / results["bare_vllm_generate"]["tokens_per_s"]
    verdict = "met" if ratio >= GOAL_VLLM_PIPELINE else "NOT met"
    print(
        f"{'ray.data.llm / bare vllm.LLM.generate, steady tokens/s':56s} {ratio:5.2f}x  "
        f"goal >= {GOAL_VLLM_PIPELINE}: {verdict}"
    )
    results["pipeline_over_bare"] = ratio
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--topk", type=int, default=20, help="logprobs_top_k of the comparison (0: skip it)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated off/on runs of the top-k comparison")
    parser.add_argument("--topk-only", action="store_true", help="only the top-k comparison")
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="vllm: the ray.data.llm pipeline against a bare vllm.LLM.generate instead",
    )
    parser.add_argument("--repeat", type=int, default=8, help="vllm: the rows repeated this many times")
    args = parser.parse_args()

    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    ensure_ray(num_cpus=2, attempts=4)  # first: a busy machine can make the local start slow
    kit = ensure_kit()
    target = kit_paths(kit)["target"]
    rows = read_rows(kit_paths(kit)["train_prompts"])[: args.rows]
    requests = load_requests(target, rows, args.batch_size)
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        write_json(args, main_vllm(args, target, requests), "bench_distill_vllm.json")
        return
    results = {}
    if not args.topk_only:
        results["baseline_1proc_2threads"] = run_baseline(target, requests, args.max_new_tokens, args.batch_size, 2)
        results["ray_1_actor"] = run_ray(target, requests, args.max_new_tokens, args.batch_size, 1)
        results["ray_2_actors"] = run_ray(target, requests, args.max_new_tokens, args.batch_size, 2)
    topk_runs = []
    for _ in range(args.repeats if args.topk else 0):  # alternated: load drifts hit both alike
        for k in (0, args.topk):
            topk_runs.append({"top_k": k, **run_ray(target, requests, args.max_new_tokens, args.batch_size, 2, k)})
    import ray

    ray.shutdown()
    udf_runs = [
        run_udf_cpu(target, requests, args.max_new_tokens, args.batch_size, k)
        for _ in range(args.repeats if args.topk else 0)
        for k in (0, args.topk)
    ]
    if not args.topk_only:
        print_table(results, args)
    if topk_runs:
        results["topk_comparison"] = print_topk(topk_runs, args)
        results["topk_udf_cpu"] = print_udf_cpu(udf_runs, args)
    write_json(args, results, "bench_distill.json")


def write_json(args, results: dict, name: str) -> None:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


def print_topk(runs: list[dict], args) -> dict:
    """Best steady tokens/s of each setting, the slowdown, and bytes stored per response token."""
    print(
        f"\nlogprobs_top_k 0 vs {args.topk}, 2 actors, {args.repeats} alternated runs each "
        f"(rows={args.rows}, max_new_tokens={args.max_new_tokens})"
    )
    print(
        f"{'top_k':>5s} {'tokens/s':>9s} {'wall s':>7s} {'driver cpu s':>12s} {'arrow B/token':>13s} "
        f"{'parquet B/token':>15s}"
    )
    for r in runs:
        per = max(r["stored_tokens"], 1)
        print(
            f"{r['top_k']:5d} {r['tokens_per_s']:9.1f} {r['wall_s']:7.1f} {r['driver_cpu_s']:12.2f} "
            f"{r['arrow_bytes'] / per:13.1f} {r['parquet_bytes'] / per:15.1f}"
        )
    rates = {k: [r["tokens_per_s"] for r in runs if r["top_k"] == k] for k in (0, args.topk)}
    best = {k: max(v) for k, v in rates.items()}
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    slowdown = 1.0 - best[args.topk] / best[0]
    size = {k: [r for r in runs if r["top_k"] == k][0] for k in (0, args.topk)}
    extra = {
        form: (size[args.topk][f"{form}_bytes"] - size[0][f"{form}_bytes"]) / max(size[0]["stored_tokens"], 1)
        for form in ("arrow", "parquet")
    }
    verdict = "met" if slowdown <= GOAL_TOPK_SLOWDOWN else "NOT met"
    print(
        f"top-{args.topk} slowdown (best steady tokens/s): {100 * slowdown:.1f} %  "
        f"goal <= {100 * GOAL_TOPK_SLOWDOWN:.0f} %: {verdict}  "
        f"(mean of the runs: {100 * (1.0 - mean[args.topk] / mean[0]):.1f} %)"
    )
    print(f"top-{args.topk} adds {extra['arrow']:.1f} B/token in Arrow, {extra['parquet']:.1f} B/token in Parquet")
    return {
        "runs": runs,
        "best_tokens_per_s": best,
        "mean_tokens_per_s": mean,
        "slowdown": slowdown,
        "extra_bytes_per_token": extra,
    }


def print_udf_cpu(runs: list[dict], args) -> dict:
    best = {k: max(r["tokens_per_cpu_s"] for r in runs if r["top_k"] == k) for k in (0, args.topk)}
    listed = " / ".join(f"k={r['top_k']}: {r['tokens_per_cpu_s']:.0f}" for r in runs)
    print(f"one engine actor's callable, in process: tokens per CPU second {listed}")
    slowdown = 1.0 - best[args.topk] / best[0]
    print(f"top-{args.topk} slowdown (best tokens per CPU s): {100 * slowdown:.1f} %")
    return {"runs": runs, "best_tokens_per_cpu_s": best, "slowdown": slowdown}


def print_table(results: dict, args) -> None:
    print(
        f"\nrows={args.rows} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
        f"(kit target, greedy, CPU)"
    )
    print(f"{'run':26s} {'rows/s':>8s} {'tokens/s':>9s} {'wall s':>7s} {'tokens':>7s}")
    for name, r in results.items():
        print(f"{name:26s} {r['rows_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['wall_s']:7.1f} {r['tokens']:7d}")
    one, two, base = results["ray_1_actor"], results["ray_2_actors"], results["baseline_1proc_2threads"]
    ratios = [
        ("2 actors / 1 actor (steady tokens/s)", two["tokens_per_s"] / one["tokens_per_s"], GOAL_ACTORS),
        ("2 actors / baseline (steady tokens/s)", two["tokens_per_s"] / base["tokens_per_s"], GOAL_BASELINE),
        ("2 actors / 1 actor (wall)", one["wall_s"] / two["wall_s"], None),
        ("2 actors / baseline (wall)", base["wall_s"] / two["wall_s"], None),
    ]
    for label, ratio, goal in ratios:
        verdict = "" if goal is None else (f"goal >= {goal}: " + ("met" if ratio >= goal else "NOT met"))
        print(f"{label:40s} {ratio:5.2f}x  {verdict}")


if __name__ == "__main__":
    main()
