"""``sd2 eval``: evaluate a pair on a prompt set and write the report (local or s3://)."""

from __future__ import annotations

import logging

from sd2_ray import manifest, storage
from sd2_ray.evaluate.config import EvalConfig
from sd2_ray.evaluate.core import evaluate_pair
from sd2_ray.evaluate.report import category_lines, write_report
from sd2_ray.rows import SKIPPED_FILE, read_rows, write_skipped
from sd2_ray.runtime import run_with_gpus

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
        unreadable: list[dict] = []
        rows = read_rows(config.prompts, limit=config.max_prompts, skipped=unreadable)
        if config.gpus > 0:
            logger.info("eval as a Ray task with %s GPU(s)", config.gpus)
        report = run_with_gpus(
            evaluate_pair,
            config.gpus,
            config.target,
            config.drafter,
            rows,
            config.num_speculative_tokens,
            config,
            progress=config.gpus <= 0,
            unreadable=unreadable,
            resources=config.node_resources,
        )
        report["prompts"] = config.prompts
        skipped = unreadable + report["skipped_prompts"]
        write_skipped(storage.join(out_dir, SKIPPED_FILE), skipped)
        files = write_report(report, config.report_path)
    except Exception as err:
        manifest.fail(out_dir, STAGE, f"{type(err).__name__}: {err}")
        raise
    manifest.complete(
        out_dir,
        STAGE,
        files=files,
        num_prompts=report["num_prompts"],
        skipped=len(skipped),
        mean_accepted_length=report["mean_accepted_length"],
        measured_speedup=report["measured_speedup"],
        lossless=report["lossless"],
    )
    logger.info(
        "MAL %.3f, acceptance %.3f, predicted speedup %.2fx, measured %s, lossless %s -> %s",
        report["mean_accepted_length"],
        report["acceptance_rate"],
        report["predicted_speedup"],
        f"{report['measured_speedup']:.2f}x" if report["measured_speedup"] else "n/a",
        report["lossless"],
        config.report_path,
    )
    for line in category_lines(report):
        logger.info(line)
    return report
