"""Many drafters scored on the same prompts against one target-only baseline (the pipeline's
eval step): the baseline is measured once and reused on resume, each drafter's report gets its
own directory and manifest, complete ones are skipped."""

from __future__ import annotations

import logging
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.evaluate.config import EvalConfig

log = logging.getLogger(__name__)
BASELINE_FILE = "target-only.json"


def evaluate_drafters(configs: dict[str, EvalConfig], root: str) -> dict[str, dict[str, Any]]:
    """{drafter name: eval report} for per-drafter configs that differ only in drafter and output.

    With ``gpus`` = 0 and no node type everything runs here, the target loaded once. Else the
    target-only baseline and each drafter's eval run as Ray tasks holding that many GPUs (each
    loads the target itself; drafters run in parallel when the cluster has the GPUs); this
    process only writes the reports and manifests."""
    from sd2_ray.rows import read_rows

    reports, pending = {}, {}
    for name, config in configs.items():
        if manifest.is_complete(config.output_dir):
            reports[name] = storage.read_json(config.report_path)
        else:
            pending[name] = config
    if not pending:
        return reports
    first = next(iter(pending.values()))
    rows = read_rows(first.prompts, limit=first.max_prompts)
    baseline_path = storage.join(root, BASELINE_FILE)
    # on a cluster the eval runs where its node type is, never in the driver
    run = _evaluate_in_tasks if first.gpus > 0 or first.node_resources else _evaluate_here
    for name, config, report in run(pending, rows, baseline_path):
        report.update(name=name, drafter=config.drafter, target=config.target, prompts=config.prompts)
        write_eval(config, name, report)
        reports[name] = report
    return {name: reports[name] for name in configs}


def _evaluate_here(pending: dict[str, EvalConfig], rows, baseline_path: str):
    """In this process: the target loaded once, the drafters one after another."""
    from sd2_ray.evaluate.core import evaluate_pair, load_target

    first = next(iter(pending.values()))
    target, tokenizer = load_target(first.target, first.device, first.dtype, first.device_map)
    baseline = saved_baseline(first, rows, baseline_path)
    if baseline is None:
        baseline = measure_baseline(first, target, tokenizer, rows)
        storage.write_json(baseline_path, baseline)
    for name, config in pending.items():
        manifest.start(config.output_dir, "eval", drafter=config.drafter, name=name)
        report = evaluate_pair(
            target,
            config.drafter,
            rows,
            config.num_speculative_tokens,
            config,
            baseline=baseline,
            target_tokenizer=tokenizer,
        )
        yield name, config, report


def _evaluate_in_tasks(pending: dict[str, EvalConfig], rows, baseline_path: str):
    """As Ray tasks with ``gpus`` GPUs each on the configured node type (retried when a node is
    lost): the baseline first (or the saved one), then every drafter at once (Ray queues them for
    free GPUs); reports come back in drafter order."""
    from sd2_ray.runtime import run_with_gpus, submit_with_gpus

    first = next(iter(pending.values()))
    baseline = saved_baseline(first, rows, baseline_path)
    if baseline is None:
        log.info("eval: target-only baseline as a Ray task with %s GPU(s)", first.gpus)
        baseline = run_with_gpus(_baseline_task, first.gpus, first, rows, resources=first.node_resources)
        storage.write_json(baseline_path, baseline)
    futures = {}
    for name, config in pending.items():
        manifest.start(config.output_dir, "eval", drafter=config.drafter, name=name)
        futures[name] = submit_with_gpus(
            _drafter_task, config.gpus, config, rows, baseline, resources=config.node_resources
        )
    for name, future in futures.items():
        yield name, pending[name], future.result()


def _baseline_task(config: EvalConfig, rows) -> dict[str, Any]:
    from sd2_ray.evaluate.core import load_target

    target, tokenizer = load_target(config.target, config.device, config.dtype, config.device_map)
    return measure_baseline(config, target, tokenizer, rows)


def _drafter_task(config: EvalConfig, rows, baseline: dict[str, Any]) -> dict:
    from sd2_ray.evaluate.core import evaluate_pair, load_target

    target, tokenizer = load_target(config.target, config.device, config.dtype, config.device_map)
    return evaluate_pair(
        target,
        config.drafter,
        rows,
        config.num_speculative_tokens,
        config,
        baseline=baseline,
        target_tokenizer=tokenizer,
        progress=False,
    )


def write_eval(config: EvalConfig, name: str, report: dict[str, Any]) -> None:
    from sd2_ray.evaluate.report import write_report

    write_report(report, config.report_path)
    manifest.complete(config.output_dir, "eval", name=name, mean_accepted_length=report["mean_accepted_length"])
    log.info(
        "eval %s: MAL %.3f, predicted %.2fx, measured %s",
        name,
        report["mean_accepted_length"],
        report["predicted_speedup"],
        report["measured_speedup"],
    )


def baseline_key(config: EvalConfig, rows) -> dict[str, Any]:
    """Everything that changes a target-only measurement: a saved baseline is reused only when
    all of it is the same (the target, the prompts, every decoding and placement setting)."""
    from sd2_ray.evaluate.figures import prompt_categories
    from sd2_ray.rows import row_id

    key = {"target": config.target, "prompt_ids": [row_id(r) for r in rows], **config.pair_kwargs()}
    categories = prompt_categories(rows)
    # categories change the batching (one category per batch), hence the timing; without any,
    # the key is what it always was and a saved baseline stays valid
    return {**key, "categories": categories} if categories else key


def saved_baseline(config: EvalConfig, rows, path: str) -> dict[str, Any] | None:
    """The baseline saved by an earlier (interrupted) run, if it was measured the same way."""
    if storage.exists(path):
        saved = storage.read_json(path)
        if saved.get("key") == baseline_key(config, rows):
            return saved
        log.info("eval: %s was measured with other settings; measuring again", path)
    return None


def measure_baseline(config: EvalConfig, target, tokenizer, rows) -> dict[str, Any]:
    from sd2_ray.evaluate.core import eval_prompts, measure_target_only
    from sd2_ray.evaluate.figures import prompt_categories

    prompts, kept, _ = eval_prompts(rows, tokenizer, target, config, config.num_speculative_tokens)
    categories = prompt_categories(kept)  # batched per category, as each drafter's eval is
    baseline = measure_target_only(target, prompts, config, target_tokenizer=tokenizer, categories=categories)
    return {**baseline, "key": baseline_key(config, rows)}
