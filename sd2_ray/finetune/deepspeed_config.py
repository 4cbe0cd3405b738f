"""The whole DeepSpeed config of a fine-tune, in one place (pure: JSON in, JSON out).

Where it starts: the configured ``deepspeed_config`` JSON (local or s3://), else the package's
ZeRO template (``sd2_ray/finetune/deepspeed/zero<stage>.json``). What fills it: the template's
``"auto"`` values from the :class:`~sd2_ray.finetune.config.FinetuneConfig` (global batch,
micro-batch, accumulation, clipping, ZeRO stage, DeepSpeed's AdamW when chosen), with the
config's ``deepspeed`` overrides merged first. The driver builds it once
(:func:`deepspeed_config`, so a bad JSON fails before anything is written) and every worker
gets the finished dict in its :class:`~sd2_ray.finetune.worker_config.WorkerConfig`; the
workers read from it only the dtype they train in (:func:`training_dtype`).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from sd2_ray import storage
from sd2_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from sd2_ray.finetune.config import FinetuneSettings


def deepspeed_config(config: FinetuneSettings) -> dict[str, Any]:
    """The complete DeepSpeed config of ``config``: its template filled from its fields."""
    return fill_deepspeed_config(
        deepspeed_template(config),
        zero_stage=config.zero_stage,
        batch_size=config.batch_size,
        micro_batch=config.micro_batch,
        grad_accum=config.grad_accum,
        grad_clip=config.grad_clip,
        optimizer=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        overrides=config.deepspeed,
    )


def deepspeed_template(config: FinetuneSettings) -> dict:
    """The DeepSpeed JSON to start from: the configured file, else the package's ZeRO template."""
    if not config.deepspeed_config:
        return zero_template(config.zero_stage)
    path = config.deepspeed_config
    if not storage.exists(path):
        raise ConfigError(f"field 'deepspeed_config': {path} not found")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as err:
        raise ConfigError(f"field 'deepspeed_config': {path}: invalid JSON ({err})") from None


def zero_template(stage: int) -> dict:
    """The package's DeepSpeed ZeRO-``stage`` template (``sd2_ray/finetune/deepspeed/``)."""
    text = resources.files("sd2_ray.finetune").joinpath("deepspeed").joinpath(f"zero{stage}.json").read_text()
    return json.loads(text)


def merge_dicts(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def fill_deepspeed_config(
    base: dict,
    *,
    zero_stage: int,
    batch_size: int,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float | None,
    optimizer: str,
    lr: float,
    weight_decay: float,
    overrides: dict | None = None,
) -> dict:
    """A complete DeepSpeed config: the template's ``"auto"`` values filled from our config."""
    ds = merge_dicts(base, overrides or {})
    ds["train_batch_size"] = batch_size
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = float(grad_clip or 0.0)
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage
    if optimizer == "deepspeed_adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    else:
        ds.pop("optimizer", None)
    ds.pop("scheduler", None)  # the client cosine schedule is the one that is checkpointed
    return ds


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed computes in under ``ds_config`` (bf16 / fp16 when enabled, else fp32)."""
    import torch

    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32
