"""``sd2 prune``: load the drafter and calibration data, prune, write the output dir.

Reads top to bottom: check the output, load, prune (:func:`sd2_ray.prune.sequential.prune_model`
masks weights; method ``layers`` runs :func:`sd2_ray.prune.layers.layer_prune` instead), save
(model + tokenizer + masks or layer report + config) into a local staging dir, copy it to the
output (local or s3://), mark the manifest complete last. Inside a Ray job the work runs as one
Ray task (``num_gpus`` from the config), so on a cluster it lands on a GPU node; otherwise it runs
in-process. Ray is imported only on that path.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.errors import ConfigError, DataError
from sd2_ray.prune.config import PruneConfig

log = logging.getLogger(__name__)

STAGE = "prune"
LAYER_REPORT = "layer_pruning.json"


def main(config: PruneConfig) -> str:
    return run_prune(config)


def run_prune(config: PruneConfig) -> str:
    """Prune per ``config`` and return the output path; a complete output is reused unless ``overwrite``.

    With Ray up (a job on a cluster, the pipeline, a search's prune cache) the work runs as one Ray
    task holding ``num_gpus``/``num_cpus``, so it lands on a node that has them; else in-process."""
    if manifest.is_complete(config.output) and not config.overwrite:
        log.info("prune: %s is complete, skipping (overwrite=true to redo)", config.output)
        return config.output
    from sd2_ray.runtime import in_ray_job, submit_with_gpus

    if not in_ray_job() and config.num_gpus <= 0 and not config.node_resources:
        return prune_to_output(config, executor="local")
    log.info("prune: running as a Ray task (num_gpus=%s, num_cpus=%s)", config.num_gpus, config.num_cpus)
    return submit_with_gpus(
        _ray_task, config.num_gpus, config.to_dict(), num_cpus=config.num_cpus, resources=config.node_resources
    ).result()


def _ray_task(config_dict: dict[str, Any]) -> str:
    logging.basicConfig(level=logging.INFO)
    return prune_to_output(PruneConfig.model_validate(config_dict), executor="ray_task")


def _prepare_output(out: str) -> None:
    """Clear an unfinished (or overwritten) earlier output; refuse a foreign non-empty dir."""
    if manifest.read(out) is not None:
        storage.delete(out)
    elif storage.is_dir(out) and storage.list_files(out, recursive=True):
        raise ConfigError(f"output: {out} exists, is not empty and is not an sd2 prune output")


def prune_to_output(config: PruneConfig, executor: str = "local") -> str:
    """Do everything in this process: load, prune, save, publish; returns the output path."""
    out = config.output
    _prepare_output(out)
    manifest.start(out, STAGE, model=config.model, method=config.method, executor=executor)
    try:
        summary = _prune_and_publish(config)
    except BaseException as err:
        manifest.fail(out, STAGE, f"{type(err).__name__}: {err}")
        raise
    manifest.complete(out, STAGE, executor=executor, **summary)
    log.info("prune: wrote %s", out)
    return out


def _prune_and_publish(config: PruneConfig) -> dict[str, Any]:
    import torch

    from sd2_ray.models.io import load_model, resolve_model_dir

    model_dir = resolve_model_dir(config.model)
    tokenizer = _tokenizer(config, model_dir)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    batches, calibration = _calibration(config, tokenizer)  # bad data fails before the model loads
    model = load_model(model_dir, trust_remote_code=config.trust_remote_code, device=device)
    started = time.perf_counter()
    model, masks, report = _prune(model, batches, config)
    seconds = time.perf_counter() - started
    report["calibration"] = calibration
    report["model"] = config.model
    with tempfile.TemporaryDirectory(prefix="sd2-prune-") as stage:
        _save(model.cpu(), tokenizer, masks, report, config, stage)
        storage.copy_dir(stage, config.output)
    summary: dict[str, Any] = {"seconds": round(seconds, 3), "device": device}
    if config.method == "layers":
        summary["dropped_blocks"] = report["dropped_blocks"]
    else:
        summary.update(total_sparsity=report["total_sparsity"], pattern=config.pattern, layers=len(report["layers"]))
    return summary


def _prune(model, batches: list | None, config: PruneConfig) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, masks, report). Layer pruning is a different algorithm with a different result (a
    smaller model and a block report, no masks), so it has its own entry point, not a method of
    :func:`~sd2_ray.prune.sequential.prune_model`; the CLI keeps one ``--method`` for both."""
    if config.method == "layers":
        from sd2_ray.prune.layers import layer_prune

        assert config.drop_layers is not None  # PruneConfig requires it for method layers
        model, report = layer_prune(model, batches or [], config.drop_layers)
        return model, {}, report
    from sd2_ray.prune.sequential import prune_model

    return prune_model(model, batches, config)


def _tokenizer(config: PruneConfig, model_dir: str):
    """The tokenizer (required for calibration; copied into the output when there is one)."""
    from sd2_ray.models.io import load_tokenizer

    source = config.tokenizer or model_dir
    try:
        return load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError/TypeError for a missing tokenizer
        if config.calibration:
            label = "tokenizer" if config.tokenizer else "model"
            raise DataError(
                f"{label}: {config.tokenizer or config.model}: no usable tokenizer "
                f"({type(err).__name__}); pass --tokenizer DIR"
            ) from None
        log.warning("prune: no tokenizer in %s; the output will have none", source)
        return None


def _calibration(config: PruneConfig, tokenizer) -> tuple[list | None, dict[str, Any] | None]:
    from sd2_ray.prune.calibration import load_calibration

    if not config.calibration or config.method == "magnitude":
        return None, None
    return load_calibration(config.calibration, tokenizer, config.num_samples, config.seq_len, config.seed)


def _save(model, tokenizer, masks, report, config: PruneConfig, stage: str) -> None:
    from sd2_ray.models.io import save_model
    from sd2_ray.models.sparsity import save_masks

    save_model(model, stage, tokenizer=tokenizer)
    if config.method == "layers":
        storage.write_json(os.path.join(stage, LAYER_REPORT), report)
    else:
        save_masks(stage, masks, report)
    config.save(stage)
    shutil.rmtree(os.path.join(stage, ".cache"), ignore_errors=True)
