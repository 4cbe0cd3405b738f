"""``sd2 finetune``: the stage's driver, top to bottom.

:func:`run_finetune` validates the inputs (:mod:`sd2_ray.finetune.inputs`), plans the run
(the step count and the workers' :class:`~sd2_ray.finetune.worker_config.WorkerConfig`), fits
on Ray Train (the adapter :mod:`sd2_ray.finetune.ray_train`; each worker runs
:mod:`sd2_ray.finetune.ray_worker`), verifies the trained drafter's sparsity
(:mod:`sd2_ray.finetune.verify`) and publishes it (:mod:`sd2_ray.finetune.publish`). It is the
entry other stages call too: ``sd2 tune`` runs it inside a Tune function trainable and passes
``callbacks`` so every per-step report reaches Tune. Output layout::

    <output>/            HF model dir + tokenizer + masks/masks.safetensors + sparsity.json
                         + config.yaml + metrics.json + manifest.json (complete last)
    <storage_path>/<run_name>/step-0000050/ ... final/   Ray Train checkpoints

A rerun with the same output finds the run dir and Ray Train restores its latest
checkpoint; a run whose ``final`` checkpoint exists is only published.
"""

from __future__ import annotations

import logging
import tempfile

from sd2_ray import manifest, storage
from sd2_ray.finetune.config import STAGE, FinetuneConfig
from sd2_ray.finetune.inputs import check_model_and_masks, prepare_data, total_steps
from sd2_ray.finetune.publish import (
    FinetuneResult,
    cleanup,
    copy_model,
    final_checkpoint,
    final_state,
    load_result,
    selected_model,
    write_metrics,
)
from sd2_ray.finetune.verify import verify_sparsity
from sd2_ray.finetune.worker_config import WorkerConfig, worker_config

log = logging.getLogger(__name__)

# a feature head is trained whole: no masks to check (its target is never changed)
NO_MASKS = {"masked": 0, "masked_nonzero": 0, "verified": True, "feature_head": True}


def main(config: FinetuneConfig) -> FinetuneResult:
    """The CLI runner: :func:`run_finetune`, then one line on what it wrote."""
    result = run_finetune(config)
    s = result.summary
    if result.skipped:
        log.info("finetune: %s already complete", config.output)
    else:
        log.info(
            "finetune: %s written: %s steps (published step %s), loss %.4f -> %.4f, %.0f tokens/s, masked nonzero %s",
            config.output,
            s.get("steps_done"),
            s.get("published_step"),
            s.get("first_loss") or 0.0,
            s.get("final_loss") or 0.0,
            s.get("tokens_per_s_mean") or 0.0,
            s.get("sparsity_check", {}).get("masked_nonzero"),
        )
    return result


def run_finetune(config: FinetuneConfig, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.output``.

    ``callbacks``: Ray Train ``UserCallback``s run on the controller after every report
    (e.g. Tune's ``TuneReportCallback``).
    """
    if manifest.is_complete(config.output) and not config.overwrite:
        log.info("%s: complete, skipping (overwrite=true redoes it)", config.output)
        return load_result(config.output)
    if config.overwrite:
        storage.delete(config.checkpoint_run_dir())
        storage.delete(manifest.path_of(config.output))

    # 1. Validate the inputs on the driver (bad input fails in one line, before any output).
    from sd2_ray.finetune.extensions import extensions_dir
    from sd2_ray.runtime import worker_env

    extensions_dir()  # before the workers' environment is taken (worker_env)
    if config.massv is not None:
        from sd2_ray.vision.stage import drafter_model

        config = drafter_model(config)  # a text LM becomes a LLaVA drafter first (MASSV)
    local_model = check_model_and_masks(config)
    data = prepare_data(config)

    # 2. Plan: the step count and everything a worker needs (a bad DeepSpeed JSON fails here).
    # worker_env: S3 endpoint/credentials, offline hub, extension cache, set in workers that
    # lack them (a Ray cluster started before this driver's environment was).
    steps = total_steps(config, data.rows)
    worker = worker_config(config, steps, eval_data=data.eval_file, use_response_ids=data.use_ids, env=worker_env())
    manifest.start(
        config.output,
        STAGE,
        model=config.model,
        data=config.data,
        rows=data.rows,
        eval_rows=data.eval_rows,
        total_steps=steps,
        checkpoints=config.checkpoint_run_dir(),
    )
    config.save(config.output)
    try:
        # 3. Fit on Ray Train (resumed from the latest checkpoint; skipped when training finished).
        ray_result = fit(config, worker, data.files, callbacks)

        # 4. Verify: the selected model (the final one, or the best held-out step's) is copied
        # into the output and its weights checked against the input's masks.
        final, state = final_state(config)
        with tempfile.TemporaryDirectory(prefix="sd2-publish-", ignore_cleanup_errors=True) as scratch:
            model, published_step = selected_model(config, state, final, scratch)
            copy_model(model, config.output)
            sparsity = (
                verify_sparsity(config, local_model, storage.local_dir(model))
                if config.feature_head is None
                else NO_MASKS
            )

        # 5. Publish: metrics, then the manifest complete last.
        summary = write_metrics(config, state, sparsity, data.rows, steps, published_step)
        manifest.complete(
            config.output,
            STAGE,
            steps=state["step"],
            final_loss=summary["final_loss"],
            masked_nonzero=sparsity["masked_nonzero"],
            published_step=published_step,
        )
    except Exception as err:
        manifest.fail(config.output, STAGE, error=f"{type(err).__name__}: {err}"[:500])
        raise
    cleanup(config)
    return FinetuneResult(config.output, state["history"], summary, ray_result)


def fit(config: FinetuneConfig, worker: WorkerConfig, files: list[str], callbacks: list | None):
    """The Ray Train run (its ``ray.train.Result``), or None when its final checkpoint exists."""
    if final_checkpoint(config) is not None:
        log.info("%s: training already finished; publishing", config.checkpoint_run_dir())
        return None
    from sd2_ray.finetune import ray_train
    from sd2_ray.finetune.extensions import wait_for_build_locks

    wait_for_build_locks()
    return ray_train.fit(config, worker, files, callbacks)
