"""GPU smoke check: the paths only a GPU exercises, in one short run on one GPU (< 5 minutes).

1. ``sd2 eval``'s core on the kit pair on CUDA in bf16 against the same eval on the CPU in fp32:
   MAL within 2 %, greedy output lossless on both (spec decoding equals target-only decoding).
2. A 20-step masked fine-tune of the SparseGPT-pruned kit drafter with DeepSpeed ZeRO-2 over NCCL
   at world size 1, through the same step and loss module the Ray Train workers run: masked
   weights must stay exactly zero; tokens/s reported.

Needs torch, transformers and deepspeed (plus pyarrow and pydantic, which sd2_ray's storage and
configs import); no Ray. The kit is built where it is cheap (``sd2 kit``) and copied along:

    python bench/gpu_smoke.py --kit /path/to/kit [--json out.json]

Where the machine lacks packages, bring wheels (python 3.12, manylinux x86_64): deepspeed and its
requirements (hjson, ninja, py-cpuinfo, msgpack, nvidia-ml-py, einops), pyarrow, pydantic,
pydantic-core, annotated-types, typing-inspection; install them with --no-deps into a target
folder and put it on PYTHONPATH. Nothing in CI runs this file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def eval_pair(kit: str, device: str, dtype: str, prompts: int, tokens: int) -> dict:
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair
    from sd2_ray.rows import read_rows

    rows = read_rows(os.path.join(kit, "prompts", "eval.jsonl"), limit=prompts)
    settings = EvalSettings(max_new_tokens=tokens, batch_size=8, device=device, dtype=dtype)
    report = evaluate_pair(os.path.join(kit, "target"), os.path.join(kit, "drafter"), rows, 4, settings,
                           progress=False)
    return {k: report[k] for k in ("mean_accepted_length", "lossless", "tokens_per_second", "measured_speedup",
                                   "device", "dtype")}


def pruned_drafter(kit: str, out: str) -> str:
    """The kit drafter, SparseGPT 50 % on its own prompts (the prune stage, in process)."""
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import prune_to_output

    prompts = os.path.join(kit, "prompts", "train.jsonl")
    return prune_to_output(PruneConfig(model=os.path.join(kit, "drafter"), calibration=prompts, method="sparsegpt",
                                       sparsity=0.5, num_samples=32, seq_len=128, device="cuda", output=out))


def masked_finetune(model_dir: str, kit: str, steps: int) -> dict:
    """ZeRO-2 over NCCL, world size 1: the Ray Train worker's step without Ray."""
    import deepspeed
    import torch

    from sd2_ray.finetune import masking
    from sd2_ray.finetune.step import CausalLMLoss, fill_deepspeed_config, param_groups, train_step, zero_template
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import read_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda:0")
    model = load_model(model_dir, device=device).train()
    tokenizer = load_tokenizer(model_dir)
    masks = masking.prepare_masks(model_dir, model)
    masking.register_gradient_masks(model, masks)
    config = fill_deepspeed_config(zero_template(2), zero_stage=2, batch_size=8, micro_batch=8, grad_accum=1,
                                   grad_clip=1.0, optimizer="torch_adamw", lr=1e-3, weight_decay=0.0,
                                   overrides={"bf16": {"enabled": True}})
    wrapped = CausalLMLoss(model)
    optimizer = torch.optim.AdamW(param_groups(wrapped, 0.0), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config)
    rows = read_rows(os.path.join(kit, "prompts", "train.jsonl"))
    cfg = {"seq_len": 256, "response_field": "response", "grad_accum": 1}
    losses, tokens, began = [], 0, time.perf_counter()
    for i in range(steps):
        metrics = train_step(engine, rows[(i * 8) % (len(rows) - 8):][:8], tokenizer, cfg, rank=0, world=1)
        losses.append(metrics["loss"])
        tokens += metrics["tokens"]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "masked_nonzero": masking.count_masked_nonzero(engine.module.lm, masks),
            "tokens_per_s": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", default=None, help="kit directory (default: sd2's cached kit)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="/tmp/sd2-gpu-smoke")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here", file=sys.stderr)
        return 2
    from sd2_ray.kit import ensure_kit

    kit = args.kit or ensure_kit()
    results = {"gpu": torch.cuda.get_device_name(0)}
    results["eval_cuda_bf16"] = eval_pair(kit, "cuda", "bfloat16", args.prompts, args.tokens)
    results["eval_cpu_fp32"] = eval_pair(kit, "cpu", "float32", args.prompts, args.tokens)
    cuda_mal, cpu_mal = (results[k]["mean_accepted_length"] for k in ("eval_cuda_bf16", "eval_cpu_fp32"))
    results["mal_ratio_cuda_over_cpu"] = cuda_mal / cpu_mal
    results["finetune_zero2_nccl"] = masked_finetune(pruned_drafter(kit, os.path.join(args.out, "pruned")), kit,
                                                     args.steps)
    checks = {"MAL within 2 %": abs(results["mal_ratio_cuda_over_cpu"] - 1) <= 0.02,
              "lossless on CUDA": results["eval_cuda_bf16"]["lossless"] is True,
              "masked weights stay zero": results["finetune_zero2_nccl"]["masked_nonzero"] == 0}
    results["checks"] = checks
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
