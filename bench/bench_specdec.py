"""Benchmark: our speculative engine vs target-only decoding vs transformers assisted generation.

Same pair, same K, same prompts (the model kit's eval prompts rendered with the target's chat
template), greedy, all in one run. Prints a table with the goal ratios:
- ours (batch 1) / transformers ``generate(assistant_model=...)`` (batch 1 only) >= 1.3
- measured speedup (ours vs our target-only, same batch size) >= 0.8 x predicted MAL/(K·c+1)
- ours batch 8 / ours batch 1 throughput >= 3
and writes ``bench_specdec.json`` next to this file.

    python bench/bench_specdec.py [--prompts 16] [--max-new-tokens 64] [-k 4] [--threads 1]
    python bench/bench_specdec.py --random   # a random larger pair, when the kit is not built
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def load_pair(args):
    from sd2_ray.models.io import load_model, load_tokenizer

    if args.random:
        from sd2_ray.models.tiny import tiny_model
        from sd2_ray.testing.engine_pairs import char_tokenizer

        tok = char_tokenizer()
        target = tiny_model("llama", seed=0, vocab_size=len(tok), hidden=256, layers=6, heads=8, kv_heads=4,
                            intermediate=768, max_positions=1024)
        drafter = tiny_model("llama", seed=1, vocab_size=len(tok), hidden=128, layers=2, heads=4, kv_heads=2,
                             intermediate=384, max_positions=1024)
        rows = [{"prompt": "the quick brown fox " * (1 + i % 4)} for i in range(args.prompts)]
        return target, drafter, tok, tok, rows, "random llama pair (hidden 256x6 / 128x2)"
    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows

    paths = kit_paths(args.kit or ensure_kit())
    drafter_dir = args.drafter or paths["drafter-uag" if args.uag else "drafter"]
    rows = read_rows(paths["eval_prompts"], limit=args.prompts)
    return (load_model(paths["target"]), load_model(drafter_dir), load_tokenizer(paths["target"]),
            load_tokenizer(drafter_dir), rows, f"model kit ({os.path.basename(drafter_dir)})")


CPU = {"seconds": 0.0}  # process CPU time of the last timed call (1 thread: wall time minus contention)


def timed(fn):
    began, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU["seconds"] = time.process_time() - cpu
    return out, time.perf_counter() - began


def run_engine(engine, prompts, max_new, batch):
    from sd2_ray.specdec.types import GenerationRequest

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs, passes, committed, seconds, cpu = [None] * len(prompts), 0, 0, 0.0, 0.0
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        results, dt = timed(lambda: engine.generate([GenerationRequest(prompts[i], max_new) for i in chunk]))
        seconds += dt
        cpu += CPU["seconds"]
        for i, r in zip(chunk, results):
            outputs[i] = r.token_ids
            passes += r.stats.target_passes
            committed += r.stats.committed_tokens
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "seconds": seconds, "tps": tokens / seconds, "tokens": tokens,
            "mal": committed / passes, "cpu": cpu, "cpu_tps": tokens / cpu}


def run_hf(target, drafter, prompts, max_new, k, eos):
    outputs, seconds, cpu = [], 0.0, 0.0
    for p in prompts:
        ids = torch.tensor([p])
        kwargs = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0],
                      attention_mask=torch.ones_like(ids))
        if drafter is not None:
            kwargs.update(assistant_model=drafter)
            drafter.generation_config.num_assistant_tokens = k
            drafter.generation_config.num_assistant_tokens_schedule = "constant"
            drafter.generation_config.assistant_confidence_threshold = 0.0
        out, dt = timed(lambda: target.generate(ids, **kwargs))
        seconds += dt
        cpu += CPU["seconds"]
        outputs.append(out[0, len(p):].tolist())
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "seconds": seconds, "tps": tokens / seconds, "tokens": tokens,
            "cpu": cpu, "cpu_tps": tokens / cpu}


def step_cost(model, context: int = 64, reps: int = 30) -> float:
    """Seconds of one single-token forward with a KV cache of ``context`` tokens (batch 1)."""
    from transformers import DynamicCache

    ids = torch.randint(3, 50, (1, context))
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    nxt = torch.tensor([[5]])
    began = time.process_time()
    for _ in range(reps):
        model(nxt, past_key_values=cache, use_cache=True)
        cache.crop(-1)
    return (time.process_time() - began) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--random", action="store_true", help="random larger pair instead of the kit")
    ap.add_argument("--uag", action="store_true", help="the kit's cross-tokenizer drafter")
    ap.add_argument("--kit", help="an existing kit dir (default: ensure_kit())")
    ap.add_argument("--drafter", help="another drafter dir to pair with the kit's target")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from sd2_ray.evaluate.core import prepare_prompts
    from sd2_ray.models.macs import cost_coefficient, predicted_speedup
    from sd2_ray.specdec.engine import SpeculativeEngine

    target, drafter, t_tok, d_tok, rows, what = load_pair(args)
    prompts = prepare_prompts(rows, t_tok)
    k, n = args.num_speculative_tokens, args.max_new_tokens
    spec = SpeculativeEngine(target, drafter, k, t_tok, d_tok)
    base = SpeculativeEngine(target, None, 0, t_tok)
    for engine in (spec, base):  # warm-up, untimed
        run_engine(engine, prompts[:2], 8, 2)

    r = {}
    r["ours_target_only_b1"] = run_engine(base, prompts, n, 1)
    r["ours_spec_b1"] = run_engine(spec, prompts, n, 1)
    r["ours_target_only_b8"] = run_engine(base, prompts, n, 8)
    r["ours_spec_b8"] = run_engine(spec, prompts, n, 8)
    eos = spec.eos_token_ids
    r["hf_target_only_b1"] = run_hf(target, None, prompts, n, k, eos)
    hf_kwargs = {}
    if spec.cross_tokenizer:
        hf_kwargs = dict(tokenizer=t_tok, assistant_tokenizer=d_tok)
    r["hf_assisted_b1"] = run_hf_assisted(target, drafter, prompts, n, k, eos, hf_kwargs)

    cost = cost_coefficient(drafter, target)
    mal = r["ours_spec_b1"]["mal"]  # same for b8: batching does not change what is accepted
    predicted = predicted_speedup(mal, k, cost)
    time_c = step_cost(drafter) / step_cost(target)
    def ratio(num, den, key):
        return r[num][key] / r[den][key]

    measured_b1 = ratio("ours_spec_b1", "ours_target_only_b1", "cpu_tps")
    measured_b8 = ratio("ours_spec_b8", "ours_target_only_b8", "cpu_tps")
    lossless = all(r[name]["outputs"] == r["ours_target_only_b1"]["outputs"]
                   for name in ("ours_spec_b1", "ours_spec_b8", "ours_target_only_b8"))
    hf_same = r["hf_target_only_b1"]["outputs"] == r["ours_target_only_b1"]["outputs"]
    goals = []
    for key, label in (("tps", "wall"), ("cpu_tps", "cpu")):
        goals += [
            (f"ours spec b1 / HF assisted b1 [{label}]", ratio("ours_spec_b1", "hf_assisted_b1", key), 1.3),
            (f"ours spec b8 / HF assisted b1 [{label}]", ratio("ours_spec_b8", "hf_assisted_b1", key), 1.3),
            (f"measured b1 / predicted [{label}]",
             ratio("ours_spec_b1", "ours_target_only_b1", key) / predicted, 0.8),
            (f"measured b8 / predicted [{label}]",
             ratio("ours_spec_b8", "ours_target_only_b8", key) / predicted, 0.8),
            (f"ours spec b8 / ours spec b1 [{label}]", ratio("ours_spec_b8", "ours_spec_b1", key), 3.0),
        ]
    print(f"\n{what}: {len(prompts)} prompts x {n} new tokens, K={k}, greedy, {args.threads} thread(s)")
    print(f"{'run':<24}{'tok/s wall':>11}{'tok/s cpu':>10}{'wall s':>8}{'cpu s':>8}{'MAL':>6}")
    for name, v in r.items():
        print(f"{name:<24}{v['tps']:>11.1f}{v['cpu_tps']:>10.1f}{v['seconds']:>8.2f}{v['cpu']:>8.2f}"
              f"{v.get('mal', float('nan')):>6.2f}")
    print(f"\nMACs cost coefficient c = {cost:.4f}; time-based c (drafter/target 1-token step) = {time_c:.3f}")
    print(f"predicted speedup MAL/(K·c+1) = {predicted:.3f} (MACs c), {predicted_speedup(mal, k, time_c):.3f} "
          f"(time c); measured (cpu) b1 {measured_b1:.3f}, b8 {measured_b8:.3f}")
    print(f"lossless (ours spec/target-only, b1/b8 identical): {lossless}; HF greedy == ours: {hf_same}\n")
    print(f"{'goal':<44}{'ratio':>7}{'goal':>6}  met")
    for name, value, goal in goals:
        print(f"{name:<44}{value:>7.2f}{goal:>6.1f}  {'yes' if value >= goal else 'NO'}")
    summary = {name: {k2: v2 for k2, v2 in v.items() if k2 != "outputs"} for name, v in r.items()}
    summary.update(pair=what, cost_coefficient=cost, time_cost_coefficient=time_c, predicted=predicted,
                   measured_b1=measured_b1, measured_b8=measured_b8, lossless=lossless,
                   goals={name: {"ratio": value, "goal": goal} for name, value, goal in goals})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_specdec.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)


def run_hf_assisted(target, drafter, prompts, n, k, eos, extra):
    if not extra:
        return run_hf(target, drafter, prompts, n, k, eos)
    outputs, seconds, cpu = [], 0.0, 0.0
    drafter.generation_config.num_assistant_tokens = k
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    for p in prompts:
        ids = torch.tensor([p])
        out, dt = timed(lambda: target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0],
                                                assistant_model=drafter, **extra))
        seconds += dt
        cpu += CPU["seconds"]
        outputs.append(out[0, len(p):].tolist())
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "seconds": seconds, "tps": tokens / seconds, "tokens": tokens,
            "cpu": cpu, "cpu_tps": tokens / cpu}


if __name__ == "__main__":
    main()
