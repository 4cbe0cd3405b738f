"""Benchmark of feature streaming: does the target-feature stage keep a feature head's training fed?

Runs the real `sd2 finetune` with a `feature_head` section (Ray Data actor pool -> Ray Train +
DeepSpeed ZeRO-2, CPU) on the model kit's target twice in one process, alternating:

  streamed      the target's features computed by the actor pool while the head trains
  precomputed   the same features computed first into Ray's object store (materialize), then trained on

and compares the training loop's throughput: tokens trained per second of the loop's wall clock
(step 3 to the last, so data waits count; start-up, the precompute itself and publishing do not).
Goal: streamed >= 0.8x precomputed, with no hidden state on disk (the output and Ray's spill
directory are checked for feature files).

    python bench/bench_feature_stream.py [--steps 40] [--rows 320] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

GOAL = 0.8


def loop_tokens_per_s(history: list[dict]) -> float:
    steady = history[2:]
    if len(steady) < 2:
        return float("nan")
    seconds = steady[-1]["wall_time"] - history[1]["wall_time"]
    return sum(h["tokens"] for h in steady) / seconds


def run(root: str, data: str, target: str, name: str, args, materialize: bool) -> float:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune

    config = FinetuneConfig(
        model=target,
        data=data,
        output=os.path.join(root, name),
        workers=1,
        batch_size=8,
        max_steps=args.steps,
        seq_len=256,
        lr=1e-3,
        checkpoint_every=10_000,
        feature_head={"variant": "eagle", "stream": {"batch_size": 8, "materialize": materialize}},
    )
    result = run_finetune(config)
    return loop_tokens_per_s(result.history)


def feature_files(paths: list[str]) -> list[str]:
    """Files that could hold hidden states: Parquet or spilled objects under ``paths``."""
    found = []
    for path in paths:
        for folder, _, files in os.walk(path):
            found += [os.path.join(folder, f) for f in files if f.endswith(".parquet") or "spill" in folder]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    kit = ensure_kit()
    rows = read_rows(kit_paths(kit)["train_prompts"])[: args.rows]
    ensure_ray(num_cpus=3)
    import ray

    session = ray.get_runtime_context().gcs_address  # noqa: F841 - Ray is up before the runs
    speeds: dict[str, list[float]] = {"streamed": [], "precomputed": []}
    with tempfile.TemporaryDirectory(prefix="sd2-bench-stream-") as root:
        data = os.path.join(root, "rows.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for repeat in range(args.repeats):
            for name, materialize in (("streamed", False), ("precomputed", True)):
                tps = run(root, data, os.path.join(kit, "target"), f"{name}-{repeat}", args, materialize)
                speeds[name].append(tps)
                print(f"{name:12s} run {repeat}: {tps:8.0f} tokens/s", flush=True)
        on_disk = feature_files([root, "/tmp/ray/session_latest"])
    streamed, precomputed = statistics.median(speeds["streamed"]), statistics.median(speeds["precomputed"])
    ratio = streamed / precomputed
    print()
    print(f"{'run':12s} {'tokens/s (median)':>18s}  per run")
    for name, values in speeds.items():
        print(f"{name:12s} {statistics.median(values):18.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    met = ratio >= GOAL and not on_disk
    print(f"\nstreamed / precomputed = {ratio:.3f} (goal >= {GOAL}); feature files on disk: {len(on_disk)}; met: {met}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speeds": speeds, "ratio": ratio, "goal": GOAL, "on_disk": on_disk, "met": met}, f, indent=2)


if __name__ == "__main__":
    main()
