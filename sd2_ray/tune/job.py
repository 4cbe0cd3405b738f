"""``sd2 tune``: run (or finish) the search and write its report; see :class:`TuneConfig`.

Output layout (local or s3://)::

    OUTPUT/config.yaml, manifest.json (complete last)
    OUTPUT/trials.json, tune_report.md, pareto.png, best.json, best/ (the winning drafter)
    OUTPUT/pruned-cache/<method>-<level>-<hash>/   pruned models shared by trials
    OUTPUT/trials/<trial_id>/{drafter,checkpoints,attempts.json,eval.json,result.json}
    OUTPUT/search/                                 Ray Tune experiment state (Tuner.restore)
    OUTPUT/data/train.parquet                      JSONL training rows staged as Parquet
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from sd2_ray import manifest, storage
from sd2_ray.errors import ConfigError
from sd2_ray.kit import with_kit_paths
from sd2_ray.tune.config import TuneConfig
from sd2_ray.tune.report import TRIALS_FILE, write_reports
from sd2_ray.tune.space import grid, prune_fields

log = logging.getLogger(__name__)

STAGE = "tune"


def main(config: TuneConfig) -> dict[str, Any]:
    if manifest.is_complete(config.output) and not config.overwrite:
        log.info("tune: %s is complete, skipping (overwrite=true to redo)", config.output)
        return {"skipped": True, "trials": storage.read_json(storage.join(config.output, TRIALS_FILE))}
    return run_tune(stage_data(with_kit_paths(config).with_cluster_placement()))


def stage_data(config: TuneConfig) -> TuneConfig:
    """Training rows that are not Parquet -> one Parquet file under OUTPUT/data (once), so every
    trial's fine-tune reads it as it is instead of staging its own copy."""
    from sd2_ray.finetune.inputs import stage_rows
    from sd2_ray.rows import data_files, read_rows

    if all(f.endswith(".parquet") for f in data_files(config.data)):
        return config
    staged = storage.join(config.output, "data", "train.parquet")
    if not storage.exists(staged) or config.overwrite:
        rows = read_rows(config.data)
        stage_rows(rows, staged)
        log.info("tune: staged %d rows of %s as %s", len(rows), config.data, staged)
    return config.model_copy(update={"data": staged, "calibration": config.calibration or config.data})


def check_inputs(config: TuneConfig) -> int:
    """Fail before starting Ray: every trial's prune/finetune config must validate and the
    paths must exist. Returns the number of trials."""
    from sd2_ray.config import format_validation_error
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.tune.trial import finetune_config

    for field in ("target", "drafter", "data", "eval_prompts"):
        if not storage.exists(getattr(config, field)):
            raise ConfigError(f"field '{field}': {getattr(config, field)} not found")
    points = grid(config)
    for params in points:
        try:
            PruneConfig.model_validate({**prune_fields(config, params), "output": config.output})
            finetune_config(config, params, config.drafter, config.output)
        except ValidationError as err:
            raise ConfigError(f"trial {params}: {format_validation_error(err)}") from None
    return len(points) * config.num_samples


def run_tune(config: TuneConfig) -> dict[str, Any]:
    from sd2_ray.tune.driver import run_search

    trials = check_inputs(config)
    if config.overwrite:
        storage.delete(manifest.path_of(config.output))
    manifest.start(config.output, STAGE, trials=trials, objective=config.objective, experiment=config.experiment_path)
    config.save(config.output)
    started = time.perf_counter()
    try:
        records = run_search(config)
        summary = write_reports(config.output, records, config.objective, config.num_speculative_tokens)
    except BaseException as err:
        manifest.fail(config.output, STAGE, f"{type(err).__name__}: {err}"[:500])
        raise
    seconds = time.perf_counter() - started
    best = summary["best"]
    manifest.complete(
        config.output,
        STAGE,
        error=None,  # a restored run clears the failed run's error
        seconds=round(seconds, 1),
        trials=summary["trials"],
        completed=summary["completed"],
        stopped_early=summary["stopped_early"],
        errored=summary["errored"],
        best_trial=best["trial_id"] if best else None,
        best_objective=best["objective"] if best else None,
    )
    if best:
        log.info(
            "tune: %d trials in %.0fs; best %s: sparsity %s, lr %s, MAL %.3f, predicted speedup %.3f",
            summary["trials"],
            seconds,
            best["trial_id"],
            best["sparsity"],
            best["lr"],
            best["mal"],
            best["predicted_speedup"],
        )
    else:
        log.warning("tune: no trial completed (%s)", summary)
    return {**summary, "seconds": seconds}
