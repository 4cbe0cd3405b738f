"""Benchmark of the distillation losses on the model kit: ``sd2-kd`` vs ``sd2``, and expected MAL while training
vs measured MAL.

Everything runs through the real stages, configured as ``sd2 run --config jobs/configs/tiny.yaml``
would (:mod:`sd2_ray.pipeline.chain` builds every config): the kit target distils the kit train prompts with its
top-20 log-probs, SparseGPT prunes the kit drafter to 50 %, then each variant fine-tunes that
pruned drafter with tiny.yaml's budget (4 epochs, lr 1e-3, batch 8) and is evaluated greedily on
the kit eval prompts (tiny.yaml's eval: 32 prompts x 48 tokens, K = 4).

  * ``--variants``: losses to compare, e.g. ``ce fkl fkl+ce tvd+ce``; ``+ce`` adds
    ``--ce-weight`` x cross-entropy. ``ce`` on generate data *is* sd2 (the baseline, measured in
    the same run for every seed); the others are sd2-kd with that loss.
  * ``--data``: ``generate`` (the pipeline's distilled rows), ``on-policy`` (DistillSpec: the
    seed-0 sd2 drafter writes greedy continuations of the same prompts, the target scores them
    with top-20 log-probs), or ``mixed`` (both sets of rows, each one half of the budget's rows).
  * ``--spearman VARIANT``: one more fine-tune of VARIANT with held-out acceptance every
    ``--eval-every`` steps and a checkpoint at each; every checkpoint's drafter is then measured
    with speculative decoding; prints the Spearman correlation of expected vs measured MAL.

Prints per seed: MAL of every variant and its ratio to sd2 of the same seed; then the means.
Writes ``<out>/bench_kd.json``. Wall-clock times are noisy on a shared machine; the CPU seconds
of each fine-tune and of the whole run (this process and every Ray process it started) are
printed too.

    python bench/bench_kd.py --seeds 0 1 2 --variants ce fkl+ce --data generate
    python bench/bench_kd.py --seeds 0 --variants ce fkl fkl+ce rkl+ce jsd+ce tvd+ce --data generate on-policy
    python bench/bench_kd.py --seeds 0 --variants ce --spearman fkl+ce
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

TOP_K = 20


def pipeline_config(out: str, overrides: dict[str, Any]):
    from sd2_ray.kit import with_kit_paths
    from sd2_ray.pipeline.config import PipelineConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fields = {
        "output": out,
        "distill.logprobs_top_k": TOP_K,
        "drafters": ["sd2", "sd2-kd"],
        "serve_smoke": False,
        **overrides,
    }
    return with_kit_paths(PipelineConfig.load(os.path.join(root, "jobs", "configs", "tiny.yaml"), fields))


def parse_variant(text: str, ce_weight: float) -> dict[str, Any]:
    loss, _, extra = text.partition("+")
    if extra not in ("", "ce"):
        raise SystemExit(f"variant '{text}': use LOSS or LOSS+ce")
    return {"loss": loss, "ce_weight": ce_weight if extra else 0.0}


def prepare(config, log: dict) -> None:
    """Distil (top-k) and prune once; both resume/skip when already complete."""
    from sd2_ray.distill.job import main as distill_main
    from sd2_ray.pipeline.chain import distill_config, prune_config
    from sd2_ray.prune.job import run_prune

    started = time.perf_counter()
    distill_main(distill_config(config))
    run_prune(prune_config(config))
    log["prepare_wall_s"] = round(time.perf_counter() - started, 1)


def on_policy_data(config, drafter: str, out: str) -> str:
    """The same prompts, continued greedily by ``drafter`` and scored by the target."""
    from sd2_ray.config import validate
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.job import main as distill_main
    from sd2_ray.pipeline.chain import distill_config

    base = distill_config(config).model_dump()
    distill_main(validate(DistillConfig, {**base, "mode": "on-policy", "drafter": drafter, "output": out}))
    return out


def mixed_data(generate: str, on_policy: str, out: str, seed: int = 0) -> str:
    """Half the rows from each set (the same row count as one set: the same budget)."""
    import random

    import pyarrow as pa

    from sd2_ray import storage
    from sd2_ray.rows import data_files

    tables = [
        pa.concat_tables([storage.read_parquet(f) for f in data_files(d)], promote_options="permissive")
        for d in (generate, on_policy)
    ]
    rows = tables[0].num_rows
    picks = random.Random(seed).sample(range(rows), rows)
    half = set(picks[: rows // 2])
    taken = [r for i, r in enumerate(tables[0].to_pylist()) if i in half] + [
        r for i, r in enumerate(tables[1].to_pylist()) if i not in half
    ]
    random.Random(seed + 1).shuffle(taken)
    storage.write_parquet(
        storage.join(out, "part-00000.parquet"),
        pa.Table.from_pylist(taken, schema=pa.unify_schemas([t.schema for t in tables], promote_options="permissive")),
    )
    return out


METER: CpuMeter | None = None


def finetune(config, variant: dict[str, Any], data: str, output: str, seed: int, **extra):
    """sd2 (ce) or sd2-kd (a divergence) exactly as the pipeline chains it, to ``output``."""
    from sd2_ray.config import validate
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune
    from sd2_ray.pipeline.chain import finetune_config

    name = "sd2" if variant["loss"] == "ce" and not extra else "sd2-kd"
    kd = config.model_copy(
        update={"kd": {**variant, **{k: v for k, v in extra.items() if k in ("eval_every", "eval_rows", "select_by")}}}
    )
    fields = finetune_config(kd, name).model_dump()
    fields.update(
        output=output,
        data=data,
        seed=seed,
        **{k: v for k, v in extra.items() if k not in ("eval_every", "eval_rows", "select_by")},
    )
    started, cpu = time.perf_counter(), METER.total() if METER else 0.0
    result = run_finetune(validate(FinetuneConfig, fields))
    reused = result.skipped  # an output completed by an earlier run of the bench
    result.summary["bench_cpu_s"] = round(METER.total() - cpu, 1) if METER and not reused else None
    return result, time.perf_counter() - started


def measure(config, drafter, rows, tokenizer=None) -> dict[str, Any]:
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair

    settings = EvalSettings.model_validate({**config.eval.model_dump(), "measure_baseline": False})
    report = evaluate_pair(
        config.target,
        drafter,
        rows,
        config.num_speculative_tokens,
        settings,
        drafter_tokenizer=tokenizer,
        progress=False,
    )
    return {"mal": report["mean_accepted_length"], "acceptance_rate": report["acceptance_rate"]}


BASELINE = "ce@generate"  # sd2 itself


def run_comparison(config, args, data_dirs: dict[str, str], rows, out: dict) -> None:
    """Every seed: sd2 first (the baseline), then every variant on every data set."""
    for seed in args.seeds:
        keys = [BASELINE] + [f"{v}@{d}" for d in args.data for v in args.variants if f"{v}@{d}" != BASELINE]
        for key in keys:
            text, _, data_name = key.partition("@")
            variant = parse_variant(text, args.ce_weight)
            output = os.path.join(args.out, "runs", f"s{seed}", key.replace("+", "_").replace("@", "-"))
            result, wall = finetune(config, variant, data_dirs[data_name], output, seed)
            mal = measure(config, output, rows)
            out["runs"].setdefault(f"s{seed}", {})[key] = {
                **mal,
                "finetune_wall_s": round(wall, 1),
                "finetune_cpu_s": result.summary["bench_cpu_s"],
                "final_loss": result.summary.get("final_loss"),
                "masked_nonzero": result.summary["sparsity_check"]["masked_nonzero"],
            }
            print(
                f"seed {seed} {key:22s} MAL {mal['mal']:.3f}  (fine-tune {wall:.0f}s wall, "
                f"{result.summary['bench_cpu_s']}s CPU)",
                flush=True,
            )
        save(args.out, out)


def run_spearman(config, args, data: str, rows, out: dict) -> None:
    """Checkpoints of one run: expected MAL at each (held-out, teacher-forced) vs measured MAL."""
    from sd2_ray import storage
    from sd2_ray.finetune.acceptance import spearman
    from sd2_ray.finetune.checkpoint import checkpoint_dir_name, drafter_from_checkpoint
    from sd2_ray.pipeline.chain import pruned_dir

    variant = parse_variant(args.spearman, args.ce_weight)
    output = os.path.join(args.out, "spearman", args.spearman.replace("+", "_"))
    ckpt = os.path.join(args.out, "spearman", "checkpoints")
    result, wall = finetune(
        config,
        variant,
        data,
        output,
        args.seeds[0],
        eval_every=args.eval_every,
        eval_rows=args.eval_rows,
        select_by="expected_mal",
        checkpoint_every=args.eval_every,
        keep_checkpoints=1000,
        storage_path=ckpt,
    )
    evals = [h for h in result.history if "expected_mal" in h]
    points = []
    run_dir = os.path.join(ckpt, storage.basename(output))
    for h in evals:
        step = h["step"]
        path = os.path.join(run_dir, checkpoint_dir_name(step))
        if os.path.isdir(path):
            drafter, tok = drafter_from_checkpoint(path, pruned_dir(config, "sd2"))
        elif step == result.summary["steps_done"]:
            drafter, tok = os.path.join(run_dir, "final", "model"), None
        else:
            continue
        mal = measure(config, drafter, rows, tok)
        points.append(
            {
                "step": step,
                "expected_mal": h["expected_mal"],
                "alpha": h["alpha"],
                "eval_loss": h["eval_loss"],
                "measured_mal": mal["mal"],
            }
        )
        print(f"step {step:4d}: expected MAL {h['expected_mal']:.3f}  measured MAL {mal['mal']:.3f}", flush=True)
    rho = spearman([p["expected_mal"] for p in points], [p["measured_mal"] for p in points])
    rho_loss = spearman([-p["eval_loss"] for p in points], [p["measured_mal"] for p in points])
    out["spearman"] = {
        "variant": args.spearman,
        "points": points,
        "spearman_expected_mal": rho,
        "spearman_minus_eval_loss": rho_loss,
        "published_step": result.summary.get("published_step"),
        "finetune_wall_s": round(wall, 1),
    }
    print(
        f"Spearman(expected MAL, measured MAL) over {len(points)} checkpoints: {rho:.3f} "
        f"(held-out -loss: {rho_loss:.3f}); published step {result.summary.get('published_step')}"
    )
    save(args.out, out)


def summary_table(out: dict, args) -> None:
    keys = [BASELINE] + [f"{v}@{d}" for d in args.data for v in args.variants if f"{v}@{d}" != BASELINE]
    print(f"\n{'seed':6s}" + "".join(f"{k:>24s}" for k in keys))
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    for seed, runs in out["runs"].items():
        base = runs.get(BASELINE, {}).get("mal")
        cells = []
        for k in keys:
            if k not in runs:
                cells.append(f"{'-':>24s}")
                continue
            ratio = runs[k]["mal"] / base if base else float("nan")
            ratios[k].append(ratio)
            cells.append(f"{runs[k]['mal']:>14.3f} ({ratio:.3f}x)")
        print(f"{seed:6s}" + "".join(cells))
    means = {k: statistics.mean(v) for k, v in ratios.items() if v}
    print(f"{'mean':6s}" + "".join(f"{means.get(k, float('nan')):>23.3f}x" for k in keys))
    out["mean_ratio_to_sd2"] = means


def save(out_dir: str, out: dict) -> None:
    with open(os.path.join(out_dir, "bench_kd.json"), "w") as f:
        json.dump(out, f, indent=1)


class CpuMeter:
    """CPU seconds of this process and every descendant (Ray's GCS, raylet, workers, Train and
    Data processes), polled every second from a thread: a process's time counts up to its last
    poll. Wall time on a shared 2-core machine says little; this says what the work cost."""

    def __init__(self, interval_s: float = 1.0):
        import threading

        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.poll()

    def poll(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                pass

    def total(self) -> float:
        self.poll()
        return sum(self.seen.values())

    def stop(self) -> float:
        total = self.total()
        self._stop.set()
        return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-kd"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["ce", "fkl+ce"])
    parser.add_argument("--data", nargs="+", default=["generate"], choices=["generate", "on-policy", "mixed"])
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--spearman", default=None, help="variant to train with held-out evals and checkpoints")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--set", nargs="*", default=[], help="pipeline overrides key=value (e.g. finetune.epochs=2)")
    args = parser.parse_args()

    import logging

    import yaml

    from sd2_ray.pipeline.chain import distilled_dir
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    config = pipeline_config(args.out, overrides)
    global METER
    METER = CpuMeter()
    ensure_ray()
    started, load = time.perf_counter(), os.getloadavg()
    out: dict[str, Any] = {"args": vars(args), "loadavg_start": load, "runs": {}}
    prepare(config, out)
    rows = read_rows(config.eval_prompts, limit=config.eval.max_prompts)
    data_dirs = {"generate": distilled_dir(config)}
    if {"on-policy", "mixed"} & set(args.data):
        first = os.path.join(args.out, "runs", f"s{args.seeds[0]}", "ce-generate")
        if not os.path.isfile(os.path.join(first, "manifest.json")):
            finetune(config, parse_variant("ce", 0.0), data_dirs["generate"], first, args.seeds[0])
        data_dirs["on-policy"] = on_policy_data(config, first, os.path.join(args.out, "distilled-on-policy"))
        if "mixed" in args.data:
            data_dirs["mixed"] = mixed_data(
                data_dirs["generate"], data_dirs["on-policy"], os.path.join(args.out, "distilled-mixed")
            )
    run_comparison(config, args, data_dirs, rows, out)
    summary_table(out, args)
    if args.spearman:
        run_spearman(config, args, data_dirs[args.data[0]], rows, out)
    out.update(
        wall_s=round(time.perf_counter() - started, 1), cpu_s=round(METER.stop(), 1), loadavg_end=os.getloadavg()
    )
    save(args.out, out)
    print(
        f"\nwall {out['wall_s']:.0f}s, CPU {out['cpu_s']:.0f}s (this process and all its Ray processes); "
        f"load average {load[0]:.1f} at start, {out['loadavg_end'][0]:.1f} at end (2 cores, shared)"
    )


if __name__ == "__main__":
    main()
