"""Device smoke: what only a GPU shows, in one command on one GPU with torch + transformers and
the staged wheels (bench/stage_gpu_smoke.sh), in at most ~7 minutes. The JSON is rewritten
after every stage, so a run cut short still returns what it measured.

Stages (each records status ok / failed / skipped, its seconds, its figures and its checks):
  imports         DeepSpeed sees CUDA (its accelerator is cuda) and DS_ACCELERATOR is unset
  eval_fp32       kit pair on CUDA fp32 against CPU fp32: MAL equal within 0.1 %, both lossless
  eval_bf16       CUDA bf16: lossless
  eval_compiled   CUDA bf16 with CUDA graphs: lossless; time c (drafter / target step time)
                  next to MAC c (the cost coefficient)
  finetune        SparseGPT-pruned kit drafter, ZeRO-3 + bf16 + gradient checkpointing + chunked
                  LM-head loss; ZeRO checkpoint after step 2, restored into a fresh engine; the
                  gathered HF save: next-step losses equal, masked weights zero, nothing gathered
                  to count them
  memory_3b       Llama-3.2-3B-shaped random drafter, 50 % masks, seq 2048, micro-batch 2, ZeRO-3
                  bf16 at world size 1: max_memory_allocated against `sd2 plan`'s estimate (15 %)
  sparsegpt_3b    SparseGPT of one 3B-width block: peak memory against the plan's prune estimate

    python bench/gpu_smoke.py --kit KIT --json out.json        (on the device)
    python bench/gpu_smoke.py --cpu --kit KIT --json out.json  (dry run here: CUDA stages skipped,
                                                                3B stages at a tiny shape)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGET_S = 420.0  # the device call's limit leaves room for start-up and the copy back
MEMORY_TOLERANCE = 0.15


class Smoke:
    """Runs stages in order, keeps their records, rewrites the JSON after each one."""

    def __init__(self, args):
        self.args, self.started = args, time.monotonic()
        self.results: dict = {"mode": "cpu dry run: CUDA stages skipped" if args.cpu else "cuda", "stages": {}}

    def stage(self, name: str, fn, *, cuda: bool = False, reserve_s: float = 0.0) -> dict | None:
        record: dict = {}
        left = BUDGET_S - (time.monotonic() - self.started)
        if cuda and self.args.cpu:
            record = {"status": "skipped", "why": "--cpu: no CUDA"}
        elif left < reserve_s:
            record = {"status": "skipped", "why": f"time budget: {left:.0f} s left, needs ~{reserve_s:.0f} s"}
        else:
            began = time.monotonic()
            try:
                record = dict(fn(), status="ok")
                if not all(record.get("checks", {}).values()):
                    record["status"] = "failed"
            except Exception as err:  # noqa: BLE001 - a stage's failure is data; the next stage still runs
                record = {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            record["seconds"] = round(time.monotonic() - began, 2)
        self.results["stages"][name] = record
        self.write()
        print(f"gpu_smoke: {name}: {record['status']} {record.get('why') or record.get('error') or ''}", flush=True)
        return record if record["status"] != "skipped" else None

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.results, indent=2, default=str))

    def ok(self) -> bool:
        return all(r["status"] != "failed" for r in self.results["stages"].values())


# ---------------------------------------------------------------- stages


def imports(cpu: bool) -> dict:
    before = os.environ.get("DS_ACCELERATOR")
    import deepspeed
    import torch
    import transformers
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available(),
        "deepspeed_accelerator": name,
        "DS_ACCELERATOR": before,
        "pyarrow": _pyarrow_kind(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    out["checks"] = {
        "no DS_ACCELERATOR in the environment": before is None,
        "DeepSpeed's accelerator is the device's": name == ("cpu" if cpu else "cuda"),
    }
    return out


def _pyarrow_kind() -> str:
    import pyarrow

    return "local stand-in (bench/localfs.py)" if getattr(pyarrow, "STAND_IN", False) else pyarrow.__version__


def eval_pair(kit: str, args, device: str, dtype: str, compile: bool = False) -> dict:
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair
    from sd2_ray.rows import read_rows

    rows = read_rows(os.path.join(kit, "prompts", "eval.jsonl"), limit=args.prompts)
    settings = EvalSettings(max_new_tokens=args.tokens, batch_size=8, device=device, dtype=dtype, compile=compile)
    report = evaluate_pair(os.path.join(kit, "target"), os.path.join(kit, "drafter"), rows, 4, settings, progress=False)
    return {
        k: report.get(k)
        for k in (
            "mean_accepted_length",
            "lossless",
            "tokens_per_second",
            "measured_speedup",
            "cost_coefficient",
            "baseline_tokens_per_second",
        )
    }


def eval_fp32(kit: str, args) -> dict:
    cpu = eval_pair(kit, args, "cpu", "float32")
    out = {"cpu_fp32": cpu}
    checks = {"lossless on CPU": cpu["lossless"] is True}
    if not args.cpu:
        cuda = eval_pair(kit, args, "cuda", "float32")
        ratio = cuda["mean_accepted_length"] / cpu["mean_accepted_length"]
        out.update(cuda_fp32=cuda, mal_ratio=ratio)
        checks.update({"MAL within 0.1 %": abs(ratio - 1) <= 1e-3, "lossless on CUDA": cuda["lossless"] is True})
    return dict(out, checks=checks)


def eval_bf16(kit: str, args) -> dict:
    out = eval_pair(kit, args, "cuda", "bfloat16")
    return dict(out, checks={"lossless": out["lossless"] is True})


def eval_compiled(kit: str, args) -> dict:
    """Compiled (CUDA graphs) pair; time c = the drafter's decode step time over the target's,
    each decoding alone, compiled, at the same batch."""
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import measure_target_only, prepare_prompts
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import read_rows

    out = eval_pair(kit, args, "cuda", "bfloat16", compile=True)
    settings = EvalSettings(max_new_tokens=args.tokens, batch_size=8, device="cuda", dtype="bfloat16", compile=True)
    rows = read_rows(os.path.join(kit, "prompts", "eval.jsonl"), limit=args.prompts)
    speeds = {}
    for part in ("target", "drafter"):
        import torch

        model = load_model(os.path.join(kit, part), dtype=torch.bfloat16, device="cuda")
        tokenizer = load_tokenizer(os.path.join(kit, part))
        speeds[part] = measure_target_only(
            model, prepare_prompts(rows, tokenizer), settings, progress=False, target_tokenizer=tokenizer
        )["tokens_per_second"]
    out["time_c"] = speeds["target"] / speeds["drafter"] if speeds["drafter"] else None
    out["mac_c"] = out["cost_coefficient"]
    return dict(out, checks={"lossless": out["lossless"] is True})


def pruned_drafter(kit: str, out: str, device: str) -> str:
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import prune_to_output

    prompts = os.path.join(kit, "prompts", "train.jsonl")
    return prune_to_output(
        PruneConfig(
            model=os.path.join(kit, "drafter"),
            calibration=prompts,
            method="sparsegpt",
            sparsity=0.5,
            num_samples=16,
            seq_len=128,
            device=device,
            output=out,
        )
    )


def init_distributed(cpu: bool) -> None:
    """World size 1 over NCCL (gloo in the dry run), as a Ray Train worker's group would be."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from sd2_ray.serve.http import free_port

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1"
    )
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False)


def finetune(kit: str, args) -> dict:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.worker_config import worker_config
    from sd2_ray.rows import read_rows
    from sd2_ray.testing.zero_ranks import restore_scenario

    device = "cpu" if args.cpu else "cuda"
    model = pruned_drafter(kit, os.path.join(args.out, "pruned"), device)
    config = FinetuneConfig(
        model=model,
        data=os.path.join(kit, "prompts", "train.jsonl"),
        output=os.path.join(args.out, "ft"),
        workers=1,
        zero_stage=3,
        batch_size=8,
        seq_len=256,
        lr=1e-3,
        warmup_steps=1,
        gradient_checkpointing=True,
        loss_chunk_tokens=128,
        use_response_ids=False,
        use_gpu=not args.cpu,
        deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    init_distributed(args.cpu)
    rows = read_rows(os.path.join(kit, "prompts", "train.jsonl"), limit=32)
    out = restore_scenario(0, 1, worker_config(config, total_steps=4), rows, os.path.join(args.out, "ft-run"), device)
    diff = max(abs(a - b) for a, b in zip(out["restored"], out["uninterrupted"][2:], strict=True))
    out["restored_loss_max_diff"] = diff
    out["checks"] = {
        "restored next-step losses equal": diff <= 1e-6 * max(1.0, abs(out["restored"][0])),
        "masked weights zero": out["masked_nonzero"] == 0,
        "counted without gathering": out["gathers_to_count"] == 0 and out["poked_count"] == 1,
        "loaded in bf16": out["loaded_dtype"] == "torch.bfloat16",
    }
    return out


def main() -> int:
    from memory_stages import memory_3b, sparsegpt_3b

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", default=None, help="kit directory (default: sd2's cached kit, built if missing)")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="dry run without CUDA: CUDA stages are skipped and say so; the 3B stages run at a tiny shape",
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prune-samples", type=int, default=64, help="calibration samples of the 3B-width block")
    parser.add_argument("--out", default="/tmp/sd2-gpu-smoke", help="scratch directory")
    parser.add_argument("--json", default=None, help="results, rewritten after every stage")
    args = parser.parse_args()
    import localfs

    localfs.install_if_missing()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (--cpu for the dry run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on CUDA must mean fp32 for the MAL comparison
    smoke = Smoke(args)
    smoke.stage("imports", lambda: imports(args.cpu))
    from sd2_ray.kit import ensure_kit

    kit = args.kit or ensure_kit()
    smoke.stage("eval_fp32", lambda: eval_fp32(kit, args), reserve_s=30)
    smoke.stage("eval_bf16", lambda: eval_bf16(kit, args), cuda=True, reserve_s=20)
    smoke.stage("finetune", lambda: finetune(kit, args), reserve_s=60)
    smoke.stage("memory_3b", lambda: memory_3b(args), reserve_s=90)
    smoke.stage("sparsegpt_3b", lambda: sparsegpt_3b(args), reserve_s=40)
    smoke.stage("eval_compiled", lambda: eval_compiled(kit, args), cuda=True, reserve_s=60)
    smoke.write()
    print(json.dumps(smoke.results, indent=2, default=str))
    return 0 if smoke.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
