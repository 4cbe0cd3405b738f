"""Benchmark of ``sd2 finetune``: cost of keeping the masks, and 2 workers vs 1.

Runs the real stage (Ray Train + DeepSpeed ZeRO-2, CPU + gloo) on a small random Llama pruned
to 50 %, three times in one process:
  masked ZeRO-2, 2 workers   vs   the same run with enforce_masks=false  (goal: <= 5 % slower)
  masked ZeRO-2, 2 workers   vs   masked ZeRO-2, 1 worker                (scaling, same global batch)
and, to separate the mask hooks from run-to-run noise on a shared machine, a plain-torch
micro-benchmark of one training step with and without the gradient-mask hooks, interleaved.
Tokens/s is the median over steps after the first two (warm-up). Prints a table and writes
``bench/bench_finetune.json``.

    python bench/bench_finetune.py [--steps 30] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

GOAL_MASK_OVERHEAD = 0.05


def run_stage(root: str, model: str, data: str, name: str, args, **overrides) -> dict:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune

    cfg = FinetuneConfig(
        model=model,
        data=data,
        output=os.path.join(root, name, "drafter"),
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=1e-3,
        checkpoint_every=10_000,
        **overrides,
    )
    start = time.perf_counter()
    result = run_finetune(cfg)
    wall = time.perf_counter() - start
    speeds = [h["tokens_per_s"] for h in result.history[2:]] or [h["tokens_per_s"] for h in result.history]
    # the loop's own throughput: data, reports and checkpoints included, start-up and publish not
    steady = result.history[2:]
    loop_s = steady[-1]["wall_time"] - result.history[1]["wall_time"] if len(steady) > 1 else float("nan")
    return {
        "name": name,
        "tokens_per_s": statistics.median(speeds),
        "wall_s": wall,
        "loop_tokens_per_s": sum(h["tokens"] for h in steady) / loop_s,
        "final_loss": result.summary["final_loss"],
        "masked_nonzero": result.summary["sparsity_check"]["masked_nonzero"],
    }


def hook_microbench(model_dir: str, args, reps: int = 30) -> dict:
    """One fwd+bwd+AdamW step with and without the mask hooks, alternated to cancel drift."""
    from sd2_ray.finetune import data as D
    from sd2_ray.finetune import masking
    from sd2_ray.models.io import load_model
    from sd2_ray.testing.tokenizer import toy_tokenizer
    from sd2_ray.testing.toy import toy_rows

    torch.set_num_threads(1)
    model = load_model(model_dir).train()
    masks = masking.prepare_masks(model_dir, model)
    tok = toy_tokenizer()
    batch = D.collate(D.encode_rows(toy_rows(args.batch_size), tok, args.seq_len), tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        D.token_loss_sum(out.logits, batch["labels"]).backward()
        opt.step()
        return time.perf_counter() - t

    plain, hooked = [], []
    for _ in range(3):
        step()
    for _ in range(reps):
        plain.append(step())
        handles = masking.register_gradient_masks(model, masks)
        hooked.append(step())
        masking.remove_hooks(handles)
    p, h = statistics.median(plain), statistics.median(hooked)
    return {"step_s_without_masks": p, "step_s_with_masks": h, "overhead": h / p - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sd2/torch_extensions"))
    from sd2_ray.testing.toy import make_sparse_drafter, write_toy_dataset

    root = tempfile.mkdtemp(prefix="bench-finetune-")
    model = make_sparse_drafter(
        os.path.join(root, "pruned"),
        0.5,
        hidden=args.hidden,
        layers=args.layers,
        heads=8,
        kv_heads=4,
        intermediate=4 * args.hidden,
    )
    data = write_toy_dataset(os.path.join(root, "data"), args.batch_size * (args.steps + 2))
    micro = hook_microbench(model, args)

    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}},
    )
    try:
        masked2 = run_stage(root, model, data, "masked-2w", args, workers=2)
        dense2 = run_stage(root, model, data, "unmasked-2w", args, workers=2, enforce_masks=False)
        masked1 = run_stage(root, model, data, "masked-1w", args, workers=1)
    finally:
        ray.shutdown()

    overhead = dense2["tokens_per_s"] / masked2["tokens_per_s"] - 1
    scaling = masked2["tokens_per_s"] / masked1["tokens_per_s"]
    rows = [
        ("masked ZeRO-2, 2 workers", masked2, f"{overhead:+.1%} vs unmasked", "<= +5.0%"),
        ("unmasked ZeRO-2, 2 workers", dense2, "baseline", ""),
        ("masked ZeRO-2, 1 worker", masked1, f"2w/1w = {scaling:.2f}x", "(2 cores)"),
    ]
    print(
        f"\nfinetune benchmark: llama hidden={args.hidden} layers={args.layers}, 50% sparse, "
        f"batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps, CPU gloo"
    )
    print(
        "tokens/s: median of the steps' compute; loop tok/s: the training loop's wall clock (data, "
        "reports, checkpoints); wall s: the whole stage (worker start-up and publish too)"
    )
    print(
        f"{'run':30} {'tokens/s':>10} {'loop tok/s':>10} {'wall s':>8} {'final loss':>10} {'masked nz':>9}  "
        f"{'ratio':24} goal"
    )
    for label, r, ratio, goal in rows:
        print(
            f"{label:30} {r['tokens_per_s']:10.0f} {r['loop_tokens_per_s']:10.0f} {r['wall_s']:8.1f} "
            f"{r['final_loss']:10.4f} "
            f"{r['masked_nonzero']:9d}  {ratio:24} {goal}"
        )
    print(
        f"{'mask hooks, plain torch step':30} {micro['step_s_with_masks'] * 1e3:8.2f}ms vs "
        f"{micro['step_s_without_masks'] * 1e3:.2f}ms  overhead {micro['overhead']:+.1%}  (goal <= +5.0%)"
    )
    report = {
        "args": vars(args),
        "masked_2w": masked2,
        "unmasked_2w": dense2,
        "masked_1w": masked1,
        "mask_overhead": overhead,
        "scaling_2w_over_1w": scaling,
        "hook_microbench": micro,
        "goal_mask_overhead": GOAL_MASK_OVERHEAD,
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_finetune.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
