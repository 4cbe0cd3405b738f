"""What the fine-tune's driver publishes once training ended (pure: no Ray).

The final checkpoint's train state names the step to publish: the final one, or with held-out
selection (``eval_every``) the best-scored step, whose ZeRO checkpoint is then turned into an
HF model dir (:func:`selected_model`). The driver copies that model into the output
(:func:`copy_model`), verifies its sparsity (:mod:`sd2_ray.finetune.verify`), writes
``metrics.json`` (:func:`write_metrics`) and drops what a published drafter no longer needs
(:func:`cleanup`). :class:`FinetuneResult` is what a caller gets back, also for an output
that was already complete (:func:`load_result`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from sd2_ray import storage
from sd2_ray.finetune.checkpoint import FINAL_CHECKPOINT, MODEL_SUBDIR
from sd2_ray.finetune.config import STAGE, FinetuneConfig
from sd2_ray.finetune.inputs import STAGED_DATA
from sd2_ray.finetune.train_state import STATE_FILE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    """What a caller (the CLI, Tune, the pipeline) gets back."""

    output: str
    history: list[dict] = field(default_factory=list)  # per-step metrics
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json without the history
    result: Any = None  # the ray.train.Result (None when the output was already complete)
    skipped: bool = False


def final_checkpoint(config: FinetuneConfig) -> str | None:
    path = storage.join(config.checkpoint_run_dir(), FINAL_CHECKPOINT)
    if storage.exists(storage.join(path, STATE_FILE)) and storage.exists(
        storage.join(path, MODEL_SUBDIR, "config.json")
    ):
        return path
    return None


def final_state(config: FinetuneConfig) -> tuple[str, dict[str, Any]]:
    """(the final checkpoint, its train state as saved by rank 0)."""
    final = final_checkpoint(config)
    if final is None:
        raise RuntimeError(f"{config.checkpoint_run_dir()}: training ended without a final checkpoint")
    return final, json.loads(storage.read_text(storage.join(final, STATE_FILE)))


def selected_model(config: FinetuneConfig, state: dict, final: str, scratch: str) -> tuple[str, int]:
    """(model dir to publish, its step): the final model, unless a held-out selection
    (``eval_every``) found an earlier step better; that step's ZeRO checkpoint is then turned
    into an HF dir under ``scratch``."""
    best = state.get("best")
    if not config.eval_every or not best or best["step"] == state["step"]:
        return storage.join(final, MODEL_SUBDIR), state["step"]
    from sd2_ray.finetune.checkpoint import checkpoint_dir_name, drafter_from_checkpoint

    source = storage.join(config.checkpoint_run_dir(), checkpoint_dir_name(best["step"]))
    if config.feature_head is not None and storage.exists(source):
        from sd2_ray.feature.head import head_from_checkpoint

        _log_selection(best, state)
        head_from_checkpoint(storage.local_dir(source), storage.local_dir(storage.join(final, MODEL_SUBDIR)), scratch)
        return scratch, best["step"]
    if not storage.exists(source):
        raise RuntimeError(
            f"{source}: the checkpoint of the best held-out step ({best['metric']} {best['value']:.4f}) is gone"
        )
    _log_selection(best, state)
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


def _log_selection(best: dict, state: dict) -> None:
    log.info(
        "finetune: publishing step %d (%s %.4f) instead of the final step %d",
        best["step"],
        best["metric"],
        best["value"],
        state["step"],
    )


def _selection(config: FinetuneConfig, state: dict, published_step: int) -> dict[str, Any]:
    best = state.get("best")
    if not config.eval_every:
        return {"select_by": "final"}
    return {"select_by": config.select_by, **(best or {}), "published_step": published_step}


def copy_model(src: str, output: str) -> None:
    """The model dir ``src`` (HF weights, config, tokenizer) into the output."""
    if storage.is_s3(src) or storage.is_s3(output):
        storage.copy_dir(src, output)
        return
    import shutil

    shutil.copytree(src, output, dirs_exist_ok=True)


def write_metrics(
    config: FinetuneConfig, state: dict, sparsity: dict, rows: int, steps: int, published_step: int
) -> dict[str, Any]:
    """``metrics.json``: the run's summary and every step's metrics; returns the summary."""
    history = state["history"]
    summary = summarize(config, history, state, sparsity, rows, steps)
    summary.update(published_step=published_step, selection=_selection(config, state, published_step))
    storage.write_json(storage.join(config.output, METRICS_FILE), {**summary, "steps": history})
    return summary


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


def cleanup(config: FinetuneConfig) -> None:
    """A published drafter needs neither its training checkpoints (kept only where the user put
    them, storage_path) nor the staged copy of its data."""
    if config.storage_path is None:
        storage.delete(config.checkpoint_root())
    storage.delete(storage.join(config.output, STAGED_DATA))
