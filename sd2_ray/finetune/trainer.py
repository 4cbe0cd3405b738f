"""Ray Train adapter: validate inputs, run the TorchTrainer, publish the fine-tuned drafter.

``run_finetune(config, callbacks=...)`` is the entry other stages call (``sd2 tune`` runs it
inside a Tune function trainable and passes ``ray.tune.integration.ray_train.
TuneReportCallback()`` so every per-step report reaches Tune). Output layout::

    <output>/            HF model dir + tokenizer + masks/masks.safetensors + sparsity.json
                         + config.yaml + metrics.json + manifest.json (complete last)
    <storage_path>/<run_name>/step-0000050/ ... final/   Ray Train checkpoints

A rerun with the same output finds the run dir and Ray Train restores its latest
checkpoint; a run whose ``final`` checkpoint exists is only published.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.errors import DataError
from sd2_ray.finetune.checkpoint import FINAL_CHECKPOINT, MODEL_SUBDIR
from sd2_ray.finetune.config import FinetuneConfig, check_loss_data
from sd2_ray.finetune.data import row_error
from sd2_ray.finetune.provenance import drafter_tokenizer, use_response_ids
from sd2_ray.finetune.train_state import STATE_FILE
from sd2_ray.finetune.worker_config import worker_config
from sd2_ray.rows import SKIPPED_FILE, require_usable, skip_record, write_skipped

log = logging.getLogger(__name__)

STAGE = "finetune"
METRICS_FILE = "metrics.json"
STAGED_DATA = "_data"


@dataclass
class FinetuneResult:
    """What a caller (the CLI, Tune, the pipeline) gets back."""

    output: str
    history: list[dict] = field(default_factory=list)  # per-step metrics
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json without the history
    result: Any = None  # the ray.train.Result (None when the output was already complete)
    skipped: bool = False


# ---------------------------------------------------------------- input checks (driver)


def check_model_and_masks(config: FinetuneConfig) -> str:
    """Local copy of the model dir's config, sparsity report and masks (not its weights: the
    workers fetch those themselves), the masks checked against the architecture."""
    from sd2_ray.models.io import model_metadata_dir
    from sd2_ray.models.sparsity import MASKS_FILE, check_masks, load_masks

    local = model_metadata_dir(config.model, extra=(MASKS_FILE,))
    if not os.path.isfile(os.path.join(local, MASKS_FILE)):
        return local
    try:
        masks = load_masks(local)
    except Exception as err:
        raise DataError(f"{config.model}: cannot read {MASKS_FILE} ({type(err).__name__})") from None
    check_masks(_shape_model(local), masks, source=config.model)
    return local


def _shape_model(local: str):
    """The architecture on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local))


@dataclass
class PreparedData:
    """What the driver staged for the workers."""

    files: list[str]  # Parquet files of the training rows
    rows: int  # training rows
    eval_file: str | None = None  # held-out rows (eval_every), never trained on
    eval_rows: int = 0
    use_ids: bool = False  # train on response_ids (they are in the drafter's tokenizer)


def prepare_data(config: FinetuneConfig) -> PreparedData:
    """Every row is checked on the driver; rows that cannot be trained on (no instruction, no
    answer, unreadable JSONL lines) are skipped and listed in ``<output>/_skipped.jsonl``. The
    configured loss is checked against the columns the rows carry before anything is written,
    and so is whose tokenizer their ``response_ids`` are in (:mod:`sd2_ray.finetune.provenance`).
    With ``eval_every`` the last ``eval_rows`` usable rows (file order) are held out. When rows
    were skipped or held out, or the data is JSONL, the training rows are staged once as
    Parquet under ``<output>/_data`` so every worker reads exactly them."""
    from sd2_ray.rows import data_files, read_jsonl

    files = data_files(config.data)
    rows, skipped, schemas = [], [], []
    for file in files:
        unreadable: list[dict] = []
        if file.endswith(".parquet"):
            arrow = storage.read_parquet(file)
            schemas.append(arrow.schema)
            table = arrow.to_pylist()
        else:
            table = read_jsonl(file, unreadable)
        skipped.extend(unreadable)
        for number, row in enumerate(table, start=1):
            problem = row_error(row, config.response_field)
            if problem:
                skipped.append({**skip_record(number - 1, row, problem), "file": file, "row": number})
            else:
                rows.append(row)
    check_loss_data(config, {key for row in rows for key, value in row.items() if value is not None})
    use_ids = use_response_ids(config, rows, drafter_tokenizer(config))
    write_skipped(storage.join(config.output, SKIPPED_FILE), skipped)
    require_usable(config.data, len(rows), skipped, config.min_usable_share)
    if skipped:
        log.warning(
            "finetune: skipped %d of %d rows (e.g. %s); see %s",
            len(skipped),
            len(rows) + len(skipped),
            skipped[0]["reason"],
            storage.join(config.output, SKIPPED_FILE),
        )
    held: list[dict] = []
    if config.eval_every:
        rows, held = rows[: -config.eval_rows], rows[-config.eval_rows :]
    if len(rows) < config.batch_size:
        raise DataError(
            f"{config.data}: {len(rows)} usable rows{' after holding out eval_rows' if held else ''}, "
            f"fewer than one global batch (batch_size {config.batch_size})"
        )
    schema = _unified(schemas) if len(schemas) == len(files) else None
    if skipped or held or schema is None:
        files = [stage_rows(rows, storage.join(config.output, STAGED_DATA, "train.parquet"), schema)]
    if not held:
        return PreparedData(files, len(rows), use_ids=use_ids)
    eval_file = stage_rows(held, storage.join(config.output, STAGED_DATA, "eval.parquet"), schema)
    return PreparedData(files, len(rows), eval_file, len(held), use_ids)


def _unified(schemas: list):
    """One schema for the Parquet files' rows, so staged rows keep their types (float32 top-k
    stays float32); None when they disagree (the rows' own types are inferred then)."""
    import pyarrow as pa

    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def stage_rows(rows: list[dict], path: str, schema=None) -> str:
    """Rows written as one Parquet file (the format every worker reads), returned as its path."""
    import pyarrow as pa

    storage.write_parquet(path, pa.Table.from_pylist(rows, schema=schema))
    return path


def total_steps(config: FinetuneConfig, rows: int) -> int:
    per_epoch = rows // config.batch_size  # the last partial batch is dropped (same on every worker)
    steps = per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps


# ---------------------------------------------------------------- the run


def final_checkpoint(config: FinetuneConfig) -> str | None:
    path = storage.join(config.checkpoint_run_dir(), FINAL_CHECKPOINT)
    if storage.exists(storage.join(path, STATE_FILE)) and storage.exists(
        storage.join(path, MODEL_SUBDIR, "config.json")
    ):
        return path
    return None


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
    from sd2_ray.finetune.extensions import extensions_dir

    extensions_dir()  # before the workers' environment is built (worker_env)
    local_model = check_model_and_masks(config)
    data = prepare_data(config)
    steps = total_steps(config, data.rows)
    from sd2_ray.runtime import worker_env

    # before any output: a bad DeepSpeed JSON fails here. worker_env: S3 endpoint/credentials,
    # offline hub, extension cache, set in workers that lack them (a Ray cluster started before
    # this driver's environment was)
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
    ray_result = None
    try:
        if final_checkpoint(config) is None:
            from sd2_ray.finetune.extensions import wait_for_build_locks
            from sd2_ray.finetune.ray_train import fit

            wait_for_build_locks()
            ray_result = fit(config, worker, data.files, callbacks)
        else:
            log.info("%s: training already finished; publishing", config.checkpoint_run_dir())
        summary, history = publish(config, local_model, data.rows, steps)
    except Exception as err:
        manifest.fail(config.output, STAGE, error=f"{type(err).__name__}: {err}"[:500])
        raise
    cleanup(config)
    return FinetuneResult(config.output, history, summary, ray_result)


def cleanup(config: FinetuneConfig) -> None:
    """A published drafter needs neither its training checkpoints (kept only where the user put
    them, storage_path) nor the staged copy of its data."""
    if config.storage_path is None:
        storage.delete(config.checkpoint_root())
    storage.delete(storage.join(config.output, STAGED_DATA))


# ---------------------------------------------------------------- publishing


def publish(config: FinetuneConfig, local_model: str, rows: int, steps: int) -> tuple[dict, list[dict]]:
    """The selected model (the final one, or the best held-out step's) + masks + verified
    sparsity + metrics into the output; manifest complete last."""
    import shutil
    import tempfile

    from sd2_ray.finetune.verify import verify_sparsity

    final = final_checkpoint(config)
    if final is None:
        raise RuntimeError(f"{config.checkpoint_run_dir()}: training ended without a final checkpoint")
    state = json.loads(storage.read_text(storage.join(final, STATE_FILE)))
    scratch = tempfile.mkdtemp(prefix="sd2-publish-")
    try:
        model_src, published_step = selected_model(config, state, final, scratch)
        storage.copy_dir(model_src, config.output) if storage.is_s3(model_src) or storage.is_s3(
            config.output
        ) else _copy_local(model_src, config.output)
        sparsity = verify_sparsity(config, local_model, storage.local_dir(model_src))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    history = state["history"]
    summary = summarize(config, history, state, sparsity, rows, steps)
    summary.update(published_step=published_step, selection=_selection(config, state, published_step))
    storage.write_json(storage.join(config.output, METRICS_FILE), {**summary, "steps": history})
    manifest.complete(
        config.output,
        STAGE,
        steps=state["step"],
        final_loss=summary["final_loss"],
        masked_nonzero=sparsity["masked_nonzero"],
        published_step=published_step,
    )
    return summary, history


def selected_model(config: FinetuneConfig, state: dict, final: str, scratch: str) -> tuple[str, int]:
    """(model dir to publish, its step): the final model, unless a held-out selection
    (``eval_every``) found an earlier step better; that step's ZeRO checkpoint is then turned
    into an HF dir under ``scratch``."""
    best = state.get("best")
    if not config.eval_every or not best or best["step"] == state["step"]:
        return storage.join(final, MODEL_SUBDIR), state["step"]
    from sd2_ray.finetune.checkpoint import checkpoint_dir_name, drafter_from_checkpoint

    source = storage.join(config.checkpoint_run_dir(), checkpoint_dir_name(best["step"]))
    if not storage.exists(source):
        raise RuntimeError(
            f"{source}: the checkpoint of the best held-out step ({best['metric']} {best['value']:.4f}) is gone"
        )
    log.info(
        "finetune: publishing step %d (%s %.4f) instead of the final step %d",
        best["step"],
        best["metric"],
        best["value"],
        state["step"],
    )
    from sd2_ray.models.io import resolve_model_dir

    drafter, tokenizer = drafter_from_checkpoint(storage.local_dir(source), resolve_model_dir(config.model))
    # ZeRO files hold the fp32 master weights; publish in the dtype the final model was saved in
    saved = json.loads(storage.read_text(storage.join(final, MODEL_SUBDIR, "config.json")))
    dtype = saved.get("dtype") or saved.get("torch_dtype")
    if isinstance(dtype, str):
        import torch

        drafter.to(getattr(torch, dtype))
    drafter.save_pretrained(scratch, safe_serialization=True)
    tokenizer.save_pretrained(scratch)
    return scratch, best["step"]


def _selection(config: FinetuneConfig, state: dict, published_step: int) -> dict[str, Any]:
    best = state.get("best")
    if not config.eval_every:
        return {"select_by": "final"}
    return {"select_by": config.select_by, **(best or {}), "published_step": published_step}


def _copy_local(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)


def summarize(config: FinetuneConfig, history: list[dict], state: dict, sparsity: dict, rows: int, steps: int) -> dict:
    losses = [h["loss"] for h in history]
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return {
        "stage": STAGE,
        "model": config.model,
        "data": config.data,
        "rows": rows,
        "total_steps": steps,
        "steps_done": state["step"],
        "restarts": state.get("restarts", 0),
        "workers": config.workers,
        "zero_stage": config.zero_stage,
        "loss": config.loss,
        "ce_weight": config.ce_weight if config.loss != "ce" else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s_mean": sum(speeds) / len(speeds) if speeds else None,
        "sparsity_check": sparsity,
    }


def load_result(output: str) -> FinetuneResult:
    path = storage.join(output, METRICS_FILE)
    metrics = storage.read_json(path) if storage.exists(path) else {}
    history = metrics.pop("steps", [])
    return FinetuneResult(output, history, metrics, None, skipped=True)
