"""Serving benchmark: speculative vs target-only serving, same run, same machine, loopback only.

Two Ray Serve applications on one local Serve instance: ``/spec`` (target + drafter, our
speculative engine) and ``/base`` (the target alone through the same server). For 1, 8 and 32
concurrent OpenAI clients (chat completions, greedy, fixed max_tokens) it measures completion
tokens/s and p50/p99 request latency, then prints a table with the speculative/target-only
ratio. Goals: >= 1.3x tokens/s at 1 client; no errors at 32 clients.

    python bench/bench_serve.py                      # model kit: target + drafter
    python bench/bench_serve.py --drafter DIR        # e.g. an SD2 drafter from `sd2 run`
    python bench/bench_serve.py --engine vllm,transformers --concurrency 1,8
                                                     # both engines, one after the other, one run
Bounded: requests per level (--requests-per-level) and a time limit per level (--level-timeout).

``--autoscale``: one speculative app with autoscaling (1..--max-replicas replicas), --clients
closed-loop clients for --load-seconds, then --idle-seconds without load; prints the running
replica count and completion tokens/s every second, the times to scale up and back down and the
failed requests, and saves a plot (--plot, PNG):

    python bench/bench_serve.py --autoscale --tiny   # a random tiny pair: quick, meaningless MAL

``--engine vllm``: the same two applications on Ray Serve LLM (vLLM with draft-model
speculative decoding, CPU: float32, eager, ``max_model_len`` 1024); vLLM counts acceptance
itself (no MAL from our /v1/spec_stats: see tests/test_vllm_acceptance.py for its counters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL_SPEEDUP_AT_1 = 1.3
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target dir (default: the model kit's target)")
    p.add_argument("--drafter", help="drafter dir (default: the model kit's drafter)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument(
        "--requests-per-level", type=int, default=32, help="requests per concurrency level (at least one per client)"
    )
    p.add_argument("--level-timeout", type=float, default=240.0, help="seconds per level before giving up")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--disable-by-batch-size",
        type=int,
        default=8,
        help="the speculative server decodes batches this large without the drafter (0: never)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per replica")
    p.add_argument(
        "--engine",
        default="transformers",
        help="comma list of engines to measure in turn: transformers (ours), vllm (ray.serve.llm)",
    )
    p.add_argument(
        "--out",
        help="JSON results (default: bench/bench_serve.json, bench/bench_serve_autoscale.json with --autoscale)",
    )
    p.add_argument("--autoscale", action="store_true", help="measure autoscaling under load instead")
    p.add_argument("--tiny", action="store_true", help="--autoscale on a random tiny pair, not the kit")
    p.add_argument("--clients", type=int, default=16, help="--autoscale: concurrent clients")
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--load-seconds", type=float, default=60.0)
    p.add_argument("--idle-seconds", type=float, default=45.0)
    p.add_argument("--plot", default=os.path.join(HERE, "bench_serve_autoscale.png"))
    return p.parse_args(argv)


from sd2_ray.serve.http import free_port  # noqa: E402


def models_and_prompts(args) -> tuple[str, str, list[str]]:
    from sd2_ray.kit import ensure_kit, kit_paths
    from sd2_ray.rows import instruction_messages, read_rows

    paths = kit_paths(ensure_kit())
    rows = read_rows(paths["eval_prompts"])
    prompts = [instruction_messages(row)[-1]["content"] for row in rows]
    return args.target or paths["target"], args.drafter or paths["drafter"], prompts


def start_apps(args, target: str, drafter: str, engine: str) -> str:
    """The speculative (/spec) and target-only (/base) applications of one engine."""
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.config import ServeConfig

    # logical CPUs: a vLLM app reserves its model replica's CPUs, one more for the replica actor
    # Ray Serve LLM places in the same bundle, and one for its ingress
    ensure_ray(num_cpus=2 * (args.threads + 2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(
        target=target,
        port=port,
        num_speculative_tokens=args.num_speculative_tokens,
        max_batch_size=args.max_batch_size,
        max_queued_requests=256,
        num_cpus_per_replica=args.threads,
        model_name="target",
        engine=engine,
    )
    if engine == "vllm":
        common.update(accelerator="cpu", dtype="float32", max_model_len=1024)
        spec = {}
    else:
        common.update(batch_wait_timeout_s=0.01)
        spec = {"speculative_disable_by_batch_size": args.disable_by_batch_size or None}
    serve.run(
        build_app(ServeConfig(drafter=drafter, app_name="spec", **spec, **common)), name="spec", route_prefix="/spec"
    )
    serve.run(build_app(ServeConfig(drafter=None, app_name="base", **common)), name="base", route_prefix="/base")
    return f"http://127.0.0.1:{port}"


async def run_level(
    base_url: str, prompts: list[str], clients: int, total: int, max_tokens: int, timeout: float
) -> dict:
    import openai

    per_client = max(1, total // clients)
    latencies: list[float] = []
    tokens, errors = [0], [0]

    async def client(i: int):
        async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=timeout) as c:
            for j in range(per_client):
                prompt = prompts[(i * per_client + j) % len(prompts)]
                start = time.perf_counter()
                try:
                    r = await c.chat.completions.create(
                        model="target",
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=max_tokens,
                        temperature=0,
                    )
                except Exception:  # noqa: BLE001 - counted, reported
                    errors[0] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                tokens[0] += r.usage.completion_tokens

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), timeout)
    except asyncio.TimeoutError:
        errors[0] += clients * per_client - len(latencies) - errors[0]
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "clients": clients,
        "requests": clients * per_client,
        "ok": len(lat),
        "errors": errors[0],
        "completion_tokens": tokens[0],
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 2) if wall else 0.0,
        "p50_s": round(statistics.median(lat), 3) if lat else float("nan"),
        "p99_s": round(pick(0.99), 3),
    }


def spec_stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/spec_stats", timeout=30).json()


def print_table(engine: str, rows: list[dict], mal: float | None) -> None:
    print(f"engine: {engine}")
    head = (
        f"{'clients':>7} | {'mode':<11} | {'ok/req':>7} | {'errors':>6} | {'tok/s':>8} | "
        f"{'p50 s':>7} | {'p99 s':>7} | {'spec/base':>9}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        for mode in ("speculative", "target-only"):
            r = row[mode]
            ratio = f"{row['speedup']:.2f}x" if mode == "speculative" else ""
            print(
                f"{r['clients']:>7} | {mode:<11} | {r['ok']:>3}/{r['requests']:<3} | {r['errors']:>6} | "
                f"{r['tokens_per_s']:>8.1f} | {r['p50_s']:>7.3f} | {r['p99_s']:>7.3f} | {ratio:>9}"
            )
    first = rows[0]
    last = rows[-1]
    if mal is not None:
        print(f"\nMAL (speculative server, all levels): {mal:.2f}")
    print(
        f"goal >= {GOAL_SPEEDUP_AT_1}x tokens/s at {first['clients']} client: {first['speedup']:.2f}x "
        f"-> {'MET' if first['speedup'] >= GOAL_SPEEDUP_AT_1 else 'NOT MET'}"
    )
    errs = last["speculative"]["errors"] + last["target-only"]["errors"]
    print(f"goal no errors at {last['clients']} clients: {errs} errors -> {'MET' if errs == 0 else 'NOT MET'}")


def measure_engine(args, engine: str, target: str, drafter: str, prompts: list[str]) -> dict:
    """Start one engine's two apps, run every level on both, stop them."""
    from ray import serve

    t0 = time.perf_counter()
    root = start_apps(args, target, drafter, engine)
    print(
        f"[{engine}] servers ready in {time.perf_counter() - t0:.1f}s (target {target}, drafter {drafter}, "
        f"K={args.num_speculative_tokens}, max_tokens={args.max_tokens})",
        flush=True,
    )
    urls = {"speculative": f"{root}/spec/v1", "target-only": f"{root}/base/v1"}
    for url in urls.values():  # warm-up: first forward passes allocate
        asyncio.run(run_level(url, prompts, 2, 2, args.max_tokens, args.level_timeout))
    rows = []
    for clients in [int(c) for c in args.concurrency.split(",")]:
        row = {}
        for mode, url in urls.items():
            row[mode] = asyncio.run(
                run_level(
                    url, prompts, clients, max(clients, args.requests_per_level), args.max_tokens, args.level_timeout
                )
            )
            print(f"  [{engine}] {clients:>2} clients {mode:<11}: {row[mode]}", flush=True)
        base = row["target-only"]["tokens_per_s"]
        row["speedup"] = row["speculative"]["tokens_per_s"] / base if base else 0.0
        rows.append({"clients": clients, **row})
    stats = spec_stats(urls["speculative"])
    result = {"levels": rows, "spec_stats": stats, "base_stats": spec_stats(urls["target-only"])}
    serve.shutdown()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.autoscale:
        sys.path.insert(0, HERE)
        from bench_serve_autoscale import measure_autoscale

        return measure_autoscale(args)
    args.out = args.out or os.path.join(HERE, "bench_serve.json")
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = sorted(set(engines) - {"transformers", "vllm"})
    if unknown:
        print(f"--engine: unknown engine(s) {unknown} (transformers, vllm)", file=sys.stderr)
        return 2
    if "vllm" in engines:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    target, drafter, prompts = models_and_prompts(args)
    results = {engine: measure_engine(args, engine, target, drafter, prompts) for engine in engines}
    for engine, result in results.items():
        print()
        stats = result["spec_stats"]
        print_table(engine, result["levels"], stats.get("mean_accepted_length"))
        if engine == "transformers":
            print(
                f"speculative server: {stats.get('batches_without_speculation', 0)} of {stats['batches']} "
                f"batches decoded without the drafter (batch >= {args.disable_by_batch_size or 'never'})"
            )
    if len(results) > 1:
        print("\nspeculative tokens/s, engine vs engine (same run):")
        first, second = engines[0], engines[1]
        for a, b in zip(results[first]["levels"], results[second]["levels"], strict=True):
            ratio = a["speculative"]["tokens_per_s"] / max(b["speculative"]["tokens_per_s"], 1e-9)
            print(f"  {a['clients']:>2} clients: {first} / {second} = {ratio:.2f}x")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "engines": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
