"""The pipeline's measuring steps: every drafter scored on the same prompts against one
target-only baseline, and a smoke check of the served SD² pair."""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.pipeline_config import PipelineConfig

log = logging.getLogger(__name__)
BASELINE_KEYS = ("temperature", "max_new_tokens", "batch_size", "num_prompts")


def evaluate_drafters(config: PipelineConfig, paths: dict[str, str], drafter_dirs: dict[str, str],
                      eval_root: str) -> dict[str, dict[str, Any]]:
    """{drafter name: eval report}; complete per-drafter evals are reused.

    With the eval section's ``gpus`` = 0 everything runs here, the target loaded once. With
    ``gpus`` > 0 the target-only baseline and each drafter's eval run as Ray tasks holding that
    many GPUs (each loads the target itself; drafters run in parallel when the cluster has the
    GPUs); this process only writes the reports and manifests."""
    from sd2_ray.rows import read_rows

    settings = config.stage("eval", target=paths["target"], drafter=paths["target"],
                            prompts=paths["eval_prompts"], output=storage.join(eval_root, "report.json"),
                            num_speculative_tokens=config.num_speculative_tokens)
    reports, pending = {}, {}
    for name, drafter in drafter_dirs.items():
        out_dir = storage.join(eval_root, name)
        if manifest.is_complete(out_dir):
            reports[name] = storage.read_json(storage.join(out_dir, "report.json"))
        else:
            pending[name] = drafter
    if not pending:
        return reports
    rows = read_rows(paths["eval_prompts"], limit=settings.max_prompts)
    baseline_path = storage.join(eval_root, "target-only.json")
    run = _evaluate_in_tasks if settings.gpus > 0 else _evaluate_here
    for name, drafter, report in run(settings, paths["target"], pending, rows, baseline_path, eval_root):
        report.update(name=name, drafter=drafter, target=paths["target"], prompts=paths["eval_prompts"])
        write_eval(eval_root, name, report)
        reports[name] = report
    return {name: reports[name] for name in drafter_dirs}


def _evaluate_here(settings, target_dir: str, pending: dict[str, str], rows, baseline_path: str,
                   eval_root: str):
    """In this process: the target loaded once, the drafters one after another."""
    from sd2_ray.evaluate.core import evaluate_pair, load_target

    target, tokenizer = load_target(target_dir, settings.device, settings.dtype, settings.device_map)
    baseline = target_only_baseline(settings, target, tokenizer, rows, baseline_path)
    for name, drafter in pending.items():
        manifest.start(storage.join(eval_root, name), "eval", drafter=drafter, name=name)
        report = evaluate_pair(target, drafter, rows, settings.num_speculative_tokens,
                               **settings.pair_kwargs(), baseline=baseline, target_tokenizer=tokenizer)
        yield name, drafter, report


def _evaluate_in_tasks(settings, target_dir: str, pending: dict[str, str], rows, baseline_path: str,
                       eval_root: str):
    """As Ray tasks with ``settings.gpus`` GPUs each: the baseline first (or the saved one), then
    every drafter at once (Ray queues them for free GPUs); reports come back in drafter order."""
    from sd2_ray.runtime import ensure_ray

    ray = ensure_ray()
    task = ray.remote(num_cpus=1, num_gpus=settings.gpus)
    baseline = saved_baseline(settings, rows, baseline_path)
    if baseline is None:
        log.info("eval: target-only baseline as a Ray task with %s GPU(s)", settings.gpus)
        baseline = ray.get(task(_baseline_task).remote(settings, target_dir, rows))
        storage.write_json(baseline_path, baseline)
    baseline_ref = ray.put(baseline)
    refs = {}
    for name, drafter in pending.items():
        manifest.start(storage.join(eval_root, name), "eval", drafter=drafter, name=name)
        refs[name] = task(_drafter_task).remote(settings, target_dir, drafter, rows, baseline_ref)
    for name, ref in refs.items():
        yield name, pending[name], ray.get(ref)


def _baseline_task(settings, target_dir: str, rows) -> dict[str, Any]:
    from sd2_ray.evaluate.core import load_target

    target, tokenizer = load_target(target_dir, settings.device, settings.dtype, settings.device_map)
    return measure_baseline(settings, target, tokenizer, rows)


def _drafter_task(settings, target_dir: str, drafter: str, rows, baseline: dict[str, Any]) -> dict:
    from sd2_ray.evaluate.core import evaluate_pair, load_target

    target, tokenizer = load_target(target_dir, settings.device, settings.dtype, settings.device_map)
    return evaluate_pair(target, drafter, rows, settings.num_speculative_tokens,
                         **settings.pair_kwargs(), baseline=baseline, target_tokenizer=tokenizer,
                         progress=False)


def write_eval(eval_root: str, name: str, report: dict[str, Any]) -> None:
    from sd2_ray.evaluate.report import write_report

    out_dir = storage.join(eval_root, name)
    write_report(report, storage.join(out_dir, "report.json"))
    manifest.complete(out_dir, "eval", name=name, mean_accepted_length=report["mean_accepted_length"])
    log.info("eval %s: MAL %.3f, predicted %.2fx, measured %s", name, report["mean_accepted_length"],
             report["predicted_speedup"], report["measured_speedup"])


def saved_baseline(settings, rows, path: str) -> dict[str, Any] | None:
    """The baseline saved by an earlier (interrupted) run, if it was measured the same way."""
    wanted = {"temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens,
              "batch_size": settings.batch_size, "num_prompts": len(rows)}
    if storage.exists(path):
        saved = storage.read_json(path)
        if all(saved.get(k) == v for k, v in wanted.items()):
            return saved
    return None


def target_only_baseline(settings, target, tokenizer, rows, path: str) -> dict[str, Any]:
    """Target-only decoding of the eval prompts, measured once per run and reused on resume."""
    baseline = saved_baseline(settings, rows, path)
    if baseline is None:
        baseline = measure_baseline(settings, target, tokenizer, rows)
        storage.write_json(path, baseline)
    return baseline


def measure_baseline(settings, target, tokenizer, rows) -> dict[str, Any]:
    from sd2_ray.evaluate.core import measure_target_only, prepare_prompts

    return measure_target_only(target, prepare_prompts(rows, tokenizer),
                               max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
                               batch_size=settings.batch_size, target_tokenizer=tokenizer)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_smoke(config: PipelineConfig, target: str, drafter: str, prompts: str,
                timeout_s: float = 180.0) -> dict[str, Any]:
    """Serve the pair on a free loopback port, send one greedy chat request, take the app down."""
    import requests
    from ray import serve

    from sd2_ray.rows import instruction_messages, read_rows
    from sd2_ray.serve.job import start

    cfg = config.stage("serve", target=target, drafter=drafter,
                       num_speculative_tokens=config.num_speculative_tokens)
    cfg.host, cfg.port = "127.0.0.1", free_port()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    row = read_rows(prompts, limit=1)[0]
    began = time.perf_counter()
    base = start(cfg)
    try:
        wait_healthy(base.removesuffix("/v1") + "/health", timeout_s)
        body = {"model": cfg.served_model_name, "messages": instruction_messages(row), "max_tokens": 16,
                "temperature": 0}
        reply = requests.post(f"{base}/chat/completions", json=body, headers=headers, timeout=timeout_s)
        reply.raise_for_status()
        stats = requests.get(f"{base}/spec_stats", headers=headers, timeout=30).json()
    finally:
        serve.delete(cfg.app_name)
    data = reply.json()
    return {"ok": bool(data["choices"][0]["message"]["content"] is not None), "url": base,
            "seconds": round(time.perf_counter() - began, 2), "completion": data["choices"][0]["message"],
            "usage": data.get("usage"), "spec_stats": stats}


def wait_healthy(url: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"served pair not healthy at {url} after {timeout_s:.0f}s")
        time.sleep(1.0)
