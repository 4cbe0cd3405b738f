"""Ray Train adapter: validate inputs, run the TorchTrainer, publish the fine-tuned drafter.

``run_finetune(config, callbacks=...)`` is the entry other stages call (``sd2 tune`` runs it
inside a Tune function trainable and passes ``ray.tune.integration.ray_train.
TuneReportCallback()`` so every per-step report reaches Tune). Output layout::

    <output>/            HF model dir + tokenizer + masks.safetensors + sparsity.json
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
from pathlib import Path
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.errors import ConfigError, DataError
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.data import row_error
from sd2_ray.finetune.train_loop import (FINAL_CHECKPOINT, MODEL_SUBDIR, STATE_FILE, fill_deepspeed_config,
                                         train_loop)

log = logging.getLogger(__name__)

STAGE = "finetune"
METRICS_FILE = "metrics.json"
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "jobs" / "deepspeed"
BUILTIN_ZERO = {  # used when the jobs/ templates are not on disk (a pip-installed package)
    2: {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_scatter": True, "allgather_bucket_size": 50_000_000,
                              "reduce_bucket_size": 50_000_000}},
    3: {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                              "stage3_param_persistence_threshold": 10_000,
                              "stage3_gather_16bit_weights_on_model_save": False}},
}


@dataclass
class FinetuneResult:
    """What a caller (the CLI, Tune, the pipeline) gets back."""

    output: str
    history: list[dict] = field(default_factory=list)  # per-step metrics
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json without the history
    result: Any = None  # the ray.train.Result (None when the output was already complete)
    skipped: bool = False


# ---------------------------------------------------------------- input checks (driver)

def check_model(config: FinetuneConfig) -> str:
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


def data_files(config: FinetuneConfig) -> list[str]:
    from sd2_ray.rows import data_files as files_of

    return files_of(config.data)


def check_data(config: FinetuneConfig, files: list[str]) -> int:
    """Row count after checking every row has an instruction and a response."""
    from sd2_ray.rows import read_jsonl, row_id

    count = 0
    for file in files:
        rows = storage.read_parquet(file).to_pylist() if file.endswith(".parquet") else read_jsonl(file)
        for number, row in enumerate(rows, start=1):
            problem = row_error(row, config.response_field)
            if problem:
                raise DataError(f"{file}: row {number} (id '{row_id(row)}'): {problem}")
        count += len(rows)
    if count == 0:
        raise DataError(f"{config.data}: dataset is empty")
    if count < config.batch_size:
        raise DataError(f"{config.data}: {count} rows, fewer than one global batch "
                        f"(batch_size {config.batch_size})")
    return count


def total_steps(config: FinetuneConfig, rows: int) -> int:
    per_epoch = rows // config.batch_size  # the last partial batch is dropped (same on every worker)
    steps = per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps


def deepspeed_template(config: FinetuneConfig) -> dict:
    if config.deepspeed_config:
        path = config.deepspeed_config
    else:
        path = str(DEEPSPEED_DIR / f"zero{config.zero_stage}.json")
        if not os.path.isfile(path):
            return json.loads(json.dumps(BUILTIN_ZERO[config.zero_stage]))
    if not storage.exists(path):
        raise ConfigError(f"field 'deepspeed_config': {path} not found")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as err:
        raise ConfigError(f"field 'deepspeed_config': {path}: invalid JSON ({err})") from None


# ---------------------------------------------------------------- the run

def loop_config(config: FinetuneConfig, steps: int, fail_once: dict | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data (shipped to every worker by Ray Train)."""
    ds = fill_deepspeed_config(
        deepspeed_template(config), zero_stage=config.zero_stage, batch_size=config.batch_size,
        micro_batch=config.micro_batch, grad_accum=config.grad_accum, grad_clip=config.grad_clip,
        optimizer=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
        overrides=config.deepspeed)
    keys = ("model", "seq_len", "response_field", "batch_size", "grad_accum", "seed", "shuffle_buffer",
            "epochs", "warmup_steps", "scheduler", "min_lr_ratio", "lr", "weight_decay", "optimizer",
            "checkpoint_every", "report_every", "report_interval_s", "enforce_masks", "cpus_per_worker")
    cfg = {k: getattr(config, k) for k in keys}
    from sd2_ray.runtime import worker_env

    # S3 endpoint/credentials, offline hub, extension cache: set in workers that lack them
    # (a Ray cluster started before this driver's environment was).
    cfg.update(total_steps=steps, deepspeed_config=ds, fail_once=fail_once, env=worker_env())
    return cfg


def build_dataset(files: list[str]):
    import ray.data

    fs, _ = storage.filesystem(files[0])
    inner = [storage.filesystem(f)[1] for f in files]
    parquet = [f for f in inner if f.endswith(".parquet")]
    jsonl = [f for f in inner if not f.endswith(".parquet")]
    parts = []
    if parquet:
        parts.append(ray.data.read_parquet(parquet, filesystem=fs))
    if jsonl:
        parts.append(ray.data.read_json(jsonl, filesystem=fs))  # pyarrow reads newline-delimited JSON
    dataset = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    dataset.context.enable_progress_bars = False  # one bar per worker per epoch floods the driver log
    dataset.context.execution_options.preserve_order = True  # file order, whichever read ends first
    return dataset


def build_trainer(config: FinetuneConfig, cfg: dict, dataset, callbacks: list | None = None):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = config.checkpoint_root()
    fs, inner = storage.filesystem(root)
    run_config = RunConfig(
        name=config.checkpoint_run_name(), storage_path=inner,
        storage_filesystem=fs if storage.is_s3(root) else None,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        callbacks=callbacks or None)
    return TorchTrainer(
        train_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        datasets={"train": dataset},
        # Not split: every worker streams the same seeded order and keeps its slice of each
        # global batch, which makes 1-vs-N runs and resumed runs see identical batches.
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
        run_config=run_config)


def final_checkpoint(config: FinetuneConfig) -> str | None:
    path = storage.join(config.checkpoint_run_dir(), FINAL_CHECKPOINT)
    if storage.exists(storage.join(path, STATE_FILE)) and storage.exists(storage.join(path, MODEL_SUBDIR, "config.json")):
        return path
    return None


def run_finetune(config: FinetuneConfig, callbacks: list | None = None,
                 fail_once: dict | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.output``.

    ``callbacks``: Ray Train ``UserCallback``s run on the controller after every report
    (e.g. Tune's ``TuneReportCallback``). ``fail_once={"step": N, "marker": path}`` makes the
    last worker raise once after step N (tests of the recovery path).
    """
    if manifest.is_complete(config.output) and not config.overwrite:
        log.info("%s: complete, skipping (overwrite=true redoes it)", config.output)
        return load_result(config.output)
    if config.overwrite:
        storage.delete(config.checkpoint_run_dir())
        storage.delete(manifest.path_of(config.output))
    local_model = check_model(config)
    files = data_files(config)
    rows = check_data(config, files)
    steps = total_steps(config, rows)
    cfg = loop_config(config, steps, fail_once)  # before any output: a bad DeepSpeed JSON fails here
    manifest.start(config.output, STAGE, model=config.model, data=config.data, rows=rows, total_steps=steps,
                   checkpoints=config.checkpoint_run_dir())
    config.save(config.output)
    ray_result = None
    try:
        if final_checkpoint(config) is None:
            ray_result = _fit(config, cfg, files, callbacks)
        else:
            log.info("%s: training already finished; publishing", config.checkpoint_run_dir())
        summary, history = publish(config, local_model, rows, steps)
    except Exception as err:
        manifest.fail(config.output, STAGE, error=f"{type(err).__name__}: {err}"[:500])
        raise
    return FinetuneResult(config.output, history, summary, ray_result)


def _fit(config: FinetuneConfig, cfg: dict, files: list[str], callbacks: list | None):
    from sd2_ray.runtime import ensure_ray

    ensure_ray()
    dataset = build_dataset(files)
    if not config.stream_data:
        # One parallel read for the whole run: otherwise every worker re-runs the read
        # pipeline (tasks, process start-up) every epoch, which dominates small runs.
        dataset = dataset.materialize()
    trainer = build_trainer(config, cfg, dataset, callbacks)
    log.info("finetune: %d workers, ZeRO-%d, %d steps, checkpoints in %s", config.workers,
             config.zero_stage, cfg["total_steps"], config.checkpoint_run_dir())
    return trainer.fit()


# ---------------------------------------------------------------- publishing

def publish(config: FinetuneConfig, local_model: str, rows: int, steps: int) -> tuple[dict, list[dict]]:
    """Final model + masks + verified sparsity + metrics into the output; manifest complete last."""
    from sd2_ray.finetune.verify import verify_sparsity

    final = final_checkpoint(config)
    if final is None:
        raise RuntimeError(f"{config.checkpoint_run_dir()}: training ended without a final checkpoint")
    state = json.loads(storage.read_text(storage.join(final, STATE_FILE)))
    model_src = storage.join(final, MODEL_SUBDIR)
    storage.copy_dir(model_src, config.output) if storage.is_s3(model_src) or storage.is_s3(config.output) \
        else _copy_local(model_src, config.output)
    sparsity = verify_sparsity(config, local_model, storage.local_dir(model_src))
    history = state["history"]
    summary = summarize(config, history, state, sparsity, rows, steps)
    storage.write_json(storage.join(config.output, METRICS_FILE), {**summary, "steps": history})
    manifest.complete(config.output, STAGE, steps=state["step"], final_loss=summary["final_loss"],
                      masked_nonzero=sparsity["masked_nonzero"])
    return summary, history


def _copy_local(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)


def summarize(config: FinetuneConfig, history: list[dict], state: dict, sparsity: dict,
              rows: int, steps: int) -> dict:
    losses = [h["loss"] for h in history]
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return {"stage": STAGE, "model": config.model, "data": config.data, "rows": rows,
            "total_steps": steps, "steps_done": state["step"], "restarts": state.get("restarts", 0),
            "workers": config.workers, "zero_stage": config.zero_stage,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "tokens_per_s_mean": sum(speeds) / len(speeds) if speeds else None,
            "sparsity_check": sparsity}


def load_result(output: str) -> FinetuneResult:
    path = storage.join(output, METRICS_FILE)
    metrics = storage.read_json(path) if storage.exists(path) else {}
    history = metrics.pop("steps", [])
    return FinetuneResult(output, history, metrics, None, skipped=True)
