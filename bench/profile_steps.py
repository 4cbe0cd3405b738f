"""Where a decode step's time goes: torch.profiler over the static KV path's K-step draft chain
and the target's one-token step, eager and compiled, batch 1, 64 cached tokens, 1 thread.
Prints per call: CPU time, aten ops run, the share of matrix multiplies, the top ops, and
time c (drafter step / target step): what bounds bench_specdec's time c.

    python bench/profile_steps.py [DRAFTER_DIR]      (default: the kit's drafter)
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K, CONTEXT = 4, 64
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def step_calls(target, drafter, compile: bool):
    """(draft chain, target step) callables on static caches holding CONTEXT tokens; each call
    rolls its cache back, so calls repeat the same step."""
    from sd2_ray.specdec.sampling import RowParams
    from sd2_ray.specdec.static_kv import StaticKV, round_capacity
    from sd2_ray.specdec.steps import DecodeSteps
    from sd2_ray.specdec.types import SamplingParams

    rp = RowParams.from_params([SamplingParams()])
    ids = torch.randint(3, 50, (1, CONTEXT))
    vocab = target.get_output_embeddings().weight.shape[0]

    def ones(width):
        return torch.ones(1, width, dtype=torch.bool)

    def cache(model):
        kv = StaticKV(model, 1, round_capacity(CONTEXT + K + 2), fixed_width=compile)
        kv.forward(ids, ones(CONTEXT))
        return kv

    d_steps, t_steps = DecodeSteps(drafter, compile), DecodeSteps(target, compile)
    d_kv, t_kv = cache(drafter), cache(target)
    chunk = torch.tensor([[5, 6]])

    def draft():
        d_steps.draft(d_kv, chunk, ones(2), K, rp, torch.zeros(1, K), vocab, True)
        d_kv.drop_last(torch.tensor([K + 1]))

    def verify():
        t_steps.logits(t_kv, chunk[:, :1], ones(1), 1, True)
        t_kv.drop_last(torch.tensor([1]))

    return draft, verify


def profile_call(name: str, fn, label: str) -> float:
    """Seconds of CPU per call (50 calls), then a profile of 10 calls printed."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):  # warm-up (compiles on the compiled path)
        fn()
    began = time.process_time()
    for _ in range(50):
        fn()
    seconds = (time.process_time() - began) / 50
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            fn()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / 10
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    total = sum(e.self_cpu_time_total for e in events)
    print(
        f"[{label}] {name}: {seconds * 1e3:.3f} ms CPU, {ops:.0f} aten ops, "
        f"matrix multiplies {matmul / max(total, 1):.0%} of the profiled time"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=8))
    return seconds


def main() -> None:
    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.models.io import load_model

    torch.set_num_threads(1)
    paths = kit_paths(ensure_kit())
    drafter_dir = sys.argv[1] if len(sys.argv) > 1 else paths["drafter"]
    target, drafter = load_model(paths["target"]).eval(), load_model(drafter_dir).eval()
    with torch.no_grad():
        for compile in (False, True):
            label = "compiled" if compile else "eager"
            draft, verify = step_calls(target, drafter, compile)
            chain = profile_call(f"draft chain (K={K})", draft, label)
            step = profile_call("target step", verify, label)
            print(f"[{label}] time c = drafter step / target step = {chain / K / step:.3f}\n")


if __name__ == "__main__":
    main()
