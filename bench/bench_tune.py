"""Benchmark of ``sd2 tune``: ASHA early stopping against the FIFO baseline (every trial runs to the
end) on the same grid over the model kit, measured in the same run.

The grid holds good and absurd learning rates; the question is how much fine-tuning ASHA saves
(optimizer steps, wall time) and whether it still finds the same best drafter.

    python bench/bench_tune.py [--steps 8] [--json bench/bench_tune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def search(kit: str, out: str, steps: int, asha: bool) -> dict:
    from sd2_ray.kit import kit_paths
    from sd2_ray.tune.config import TuneConfig
    from sd2_ray.tune.job import main

    parts = kit_paths(kit)
    config = TuneConfig(
        output=out,
        target=parts["target"],
        drafter=parts["drafter"],
        data=parts["train_prompts"],
        eval_prompts=parts["eval_prompts"],
        search_space={"sparsity": [0.5, 0.7], "lr": [3e-3, 10.0]},
        max_concurrent=1,
        max_steps=steps,
        max_eval_prompts=8,
        eval_max_new_tokens=24,
        asha={"enabled": asha, "grace_period": 2, "reduction_factor": 2},
        prune={"method": "magnitude", "num_cpus": 0.5},
        finetune={"workers": 1, "batch_size": 4, "seq_len": 96, "checkpoint_every": steps, "warmup_steps": 1},
    )
    started = time.perf_counter()
    summary = main(config)
    seconds = time.perf_counter() - started
    trials = json.load(open(os.path.join(out, "trials.json")))
    return {
        "seconds": seconds,
        "steps": sum(t["steps"] or 0 for t in trials),
        "trials": trials,
        "stopped": summary["stopped_early"],
        "best": summary["best"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sd2/torch_extensions"))
    import ray

    from sd2_ray.kit import ensure_kit

    kit = ensure_kit()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}},
    )
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        fifo = search(kit, os.path.join(tmp, "fifo"), args.steps, asha=False)
        asha = search(kit, os.path.join(tmp, "asha"), args.steps, asha=True)
    ray.shutdown()

    def best(r):
        b = r["best"] or {}
        return f"s={b.get('sparsity')} lr={b.get('lr')} obj={b.get('objective') or 0:.3f}"

    print("\n| run | fine-tuning steps | wall s | stopped early | best trial |")
    print("|---|---|---|---|---|")
    for name, r in (("FIFO (baseline)", fifo), ("ASHA", asha)):
        print(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['stopped']} | {best(r)} |")
    asha_best, fifo_best = asha["best"] or {}, fifo["best"] or {}
    same_best = all(asha_best.get(key) == fifo_best.get(key) for key in ("lr", "sparsity"))
    print(
        f"\nASHA / FIFO: steps {asha['steps'] / fifo['steps']:.2f}x, wall {asha['seconds'] / fifo['seconds']:.2f}x; "
        f"same best: {same_best}"
    )
    print("\ntrials (ASHA run):")
    for t in asha["trials"]:
        print(
            f"  s={t['sparsity']} lr={t['lr']}: {t['status']}, {t['steps']} steps, MAL {t['mal']}, "
            f"predicted speedup {t['predicted_speedup']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fifo": fifo, "asha": asha}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
