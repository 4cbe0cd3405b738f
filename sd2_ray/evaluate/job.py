"""``sd2 eval``: evaluate a pair on a prompt set and write the report (local or s3://)."""
from __future__ import annotations

import logging

from sd2_ray import manifest, storage
from sd2_ray.evaluate.config import EvalConfig
from sd2_ray.evaluate.core import evaluate_pair
from sd2_ray.evaluate.report import write_report
from sd2_ray.rows import read_rows

logger = logging.getLogger(__name__)
STAGE = "eval"


def main(config: EvalConfig) -> dict | None:
    out_dir = config.output_dir
    if manifest.is_complete(out_dir) and storage.exists(config.report_path) and not config.overwrite:
        logger.info("%s is complete; skipping (set overwrite=true to redo)", config.report_path)
        return storage.read_json(config.report_path)
    if config.gpus <= 0:  # fail before writing anything; a Ray task checks on its own node
        from sd2_ray.models.device import resolve_device

        resolve_device(config.device)
    config.save(out_dir)
    manifest.start(out_dir, STAGE, target=config.target, drafter=config.drafter, prompts=config.prompts)
    try:
        rows = read_rows(config.prompts, limit=config.max_prompts)
        report = run_eval(config, rows)
        report["prompts"] = config.prompts
        files = write_report(report, config.report_path)
    except Exception as err:
        manifest.fail(out_dir, STAGE, f"{type(err).__name__}: {err}")
        raise
    manifest.complete(out_dir, STAGE, files=files, num_prompts=report["num_prompts"],
                      mean_accepted_length=report["mean_accepted_length"],
                      measured_speedup=report["measured_speedup"], lossless=report["lossless"])
    logger.info("MAL %.3f, acceptance %.3f, predicted speedup %.2fx, measured %s, lossless %s -> %s",
                report["mean_accepted_length"], report["acceptance_rate"], report["predicted_speedup"],
                f"{report['measured_speedup']:.2f}x" if report["measured_speedup"] else "n/a",
                report["lossless"], config.report_path)
    return report


def evaluate_config(config: EvalConfig, rows, progress: bool = True) -> dict:
    """The pair evaluated as the config says, in this process."""
    return evaluate_pair(config.target, config.drafter, rows, config.num_speculative_tokens,
                         **config.pair_kwargs(), measure_baseline=config.measure_baseline, progress=progress)


def run_eval(config: EvalConfig, rows) -> dict:
    """Here, or with ``gpus`` > 0 as one Ray task holding that many GPUs (e.g. a job submitted to
    a cluster whose head has none)."""
    from sd2_ray.runtime import run_with_gpus

    if config.gpus > 0:
        logger.info("eval as a Ray task with %s GPU(s)", config.gpus)
    return run_with_gpus(evaluate_config, config.gpus, config, rows, progress=config.gpus <= 0)
