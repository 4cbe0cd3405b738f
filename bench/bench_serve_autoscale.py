"""``bench/bench_serve.py --autoscale``: Serve autoscaling of the speculative app under load.

One app (target + drafter, our engine) with ``autoscaling: {min_replicas: 1, max_replicas: N}``
and fast knobs (2 s to scale up, 5 s to scale down, load averaged over 2 s and reported
every 1 s), started as
``sd2 serve`` starts it, on a local Ray with one logical CPU per replica plus one. --clients
closed-loop clients for --load-seconds, then --idle-seconds idle: every second it prints the
running replicas and completion tokens/s; at the end the times to scale up and back to 1, failed
requests, and a PNG plot (replicas and tokens/s over time)."""

from __future__ import annotations

import json
import os
import time

# Load reports every 1 s instead of Serve's 10 s (read by each Serve process from its environment:
# on a cluster, set them on the nodes).
PUSH_INTERVALS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
AUTOSCALING = {
    "min_replicas": 1,
    "target_ongoing_requests": 4,
    "upscale_delay_s": 2,
    "downscale_delay_s": 5,
    "look_back_period_s": 2,
}


def _pair(args, out_dir: str) -> tuple[str, str, list[str]]:
    if args.tiny:
        from sd2_ray.testing.serve_pairs import save_tiny_pair

        target, drafter = save_tiny_pair(out_dir)
        return target, drafter, ["hello world", "def add(a, b):", "The quick brown fox"]
    from bench_serve import models_and_prompts

    return models_and_prompts(args)


def _start(args, target: str, drafter: str) -> str:
    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.serve.http import free_port
    from sd2_ray.serve.job import start

    for key, value in PUSH_INTERVALS.items():
        os.environ.setdefault(key, value)
    ensure_ray(num_cpus=args.max_replicas * args.threads + 1)
    config = ServeConfig.load(
        None,
        {
            "target": target,
            "drafter": drafter,
            "port": free_port(),
            "model_name": "target",
            "num_speculative_tokens": args.num_speculative_tokens,
            "num_cpus_per_replica": args.threads,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.01,
            "max_queued_requests": 256,
            "autoscaling": {**AUTOSCALING, "max_replicas": args.max_replicas},
        },
    )
    return start(config)


def _watch(load, timeline, seconds: float, phase: str, rows: list[dict]) -> None:
    from sd2_ray.testing.serve_load import failed, tokens_per_s

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        now = time.monotonic()
        outcomes = load.snapshot()
        row = {
            "t": round(now - timeline.t0, 1),
            "phase": phase,
            "replicas": timeline.latest(),
            "tokens_per_s": round(tokens_per_s(outcomes, now - 1.0, now), 1),
            "failed": len(failed(outcomes)),
        }
        rows.append(row)
        print(
            f"  t={row['t']:>6.1f}s  {phase:<5} replicas={row['replicas']}  tok/s={row['tokens_per_s']:>7.1f}  "
            f"failed={row['failed']}",
            flush=True,
        )


def _first(rows: list[dict], after: float, predicate) -> float | None:
    return next((round(r["t"] - after, 1) for r in rows if r["t"] >= after and predicate(r["replicas"] or 0)), None)


def plot(rows: list[dict], t_stop: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    top.step(t, [r["replicas"] or 0 for r in rows], where="post")
    top.set_ylabel("running replicas")
    bottom.plot(t, [r["tokens_per_s"] for r in rows])
    bottom.set_ylabel("completion tokens/s")
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        ax.axvline(t_stop, color="grey", linestyle="--")
    top.set_title("Serve autoscaling under load (dashed: load stops)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def measure_autoscale(args) -> int:
    import tempfile

    from ray import serve

    from sd2_ray.testing.serve_load import Load, Timeline, failed, running_replicas

    target, drafter, prompts = _pair(args, tempfile.mkdtemp(prefix="sd2-autoscale-"))
    base = _start(args, target, drafter)
    print(
        f"autoscale: {args.clients} clients for {args.load_seconds:.0f} s, then {args.idle_seconds:.0f} s "
        f"idle; replicas 1..{args.max_replicas}; {AUTOSCALING}",
        flush=True,
    )
    timeline = Timeline(lambda: running_replicas("sd2")).start()
    rows: list[dict] = []
    load = Load(base, args.clients, prompts, max_tokens=args.max_tokens, timeout_s=args.level_timeout).start()
    _watch(load, timeline, args.load_seconds, "load", rows)
    ended = load.stop()
    t_stop = time.monotonic() - timeline.t0
    _watch(load, timeline, args.idle_seconds, "idle", rows)
    timeline.stop()
    serve.shutdown()
    outcomes = load.snapshot()
    summary = {
        "scale_up_s": _first(rows, 0.0, lambda n: n >= 2),
        "peak_replicas": max((r["replicas"] or 0) for r in rows),
        "full_scale_s": _first(rows, 0.0, lambda n: n >= args.max_replicas),
        "back_to_1_after_stop_s": _first(rows, t_stop, lambda n: n == 1),
        "requests": len(outcomes),
        "failed": len(failed(outcomes)),
        "clients_ended": ended,
    }
    print(f"\nsummary: {summary}")
    plot(rows, t_stop, args.plot)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_serve_autoscale.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "autoscaling": AUTOSCALING, "summary": summary, "timeline": rows}, f, indent=2)
    print(f"wrote {out} and {args.plot}")
    return 0 if summary["failed"] == 0 else 1
