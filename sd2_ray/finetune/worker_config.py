"""What every Ray Train worker of a fine-tune is told, as one typed, frozen value (pure).

The driver (:mod:`sd2_ray.finetune.job`) builds a :class:`WorkerConfig` from the
:class:`~sd2_ray.finetune.config.FinetuneConfig` and what it derived from the data: the step
count, the staged held-out rows, whose token ids to train on, the finished DeepSpeed config and
the environment the workers need. It crosses the Ray boundary as plain data
(:meth:`WorkerConfig.to_loop_config`, Ray Train's ``train_loop_config``) and is validated back
into the same type on every worker (:meth:`WorkerConfig.from_loop_config`), so the loop
(:mod:`sd2_ray.finetune.ray_worker`) and the pure pieces it runs read attributes, never keys.
Nothing comes from module globals: the loop runs the same on a laptop and on a cluster.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from sd2_ray.feature.config import FeatureTrainSettings
from sd2_ray.finetune.config import FinetuneConfig, LossName, OptimizerName, SchedulerName, SelectBy
from sd2_ray.finetune.deepspeed_config import deepspeed_config
from sd2_ray.vision.config import MassvSettings

LOOP_CONFIG_KEY = "worker"  # the WorkerConfig's key in Ray Train's train_loop_config


class WorkerConfig(BaseModel):
    """Everything a training worker reads. Fields named as in :class:`FinetuneConfig` are its
    values; the rest are derived on the driver."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # the model and its rows
    model: str  # drafter model dir (local or s3://); each worker fetches it
    seq_len: int
    response_field: str
    use_response_ids: bool  # derived: train on the target's ids (decided against the data's tokenizer)
    eval_data: str | None  # derived: the staged held-out rows (Parquet), None without eval_every
    # the global batch and its order
    batch_size: int
    grad_accum: int
    seed: int
    shuffle_buffer: int
    epochs: int
    total_steps: int  # derived: optimizer steps of the run (epochs x batches, capped by max_steps)
    # optimizer and schedule
    optimizer: OptimizerName
    lr: float
    weight_decay: float
    warmup_steps: int
    scheduler: SchedulerName
    min_lr_ratio: float
    deepspeed_config: dict[str, Any]  # derived: the complete DeepSpeed config (deepspeed_config.py)
    # the loss
    loss: LossName
    ce_weight: float
    kd_temperature: float
    loss_chunk_tokens: int
    # checkpoints, reports, held-out selection
    checkpoint_every: int
    report_every: int
    report_interval_s: float
    eval_every: int | None
    select_by: SelectBy
    num_speculative_tokens: int
    # the worker itself
    enforce_masks: bool
    gradient_checkpointing: bool
    use_gpu: bool
    cpus_per_worker: float
    feature_head: FeatureTrainSettings | None  # train a feature head on streamed target features
    massv: MassvSettings | None = None  # train a MASSV drafter's phase on image + text rows
    env: dict[str, str]  # derived: variables set in a worker that lacks them (S3, offline hub, caches)

    def to_loop_config(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config``: this config as plain data, under one key."""
        return {LOOP_CONFIG_KEY: self.model_dump()}

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> WorkerConfig:
        """The worker's side of :meth:`to_loop_config`: the same typed value, validated."""
        return cls.model_validate(loop_config[LOOP_CONFIG_KEY])


def worker_config(
    config: FinetuneConfig,
    total_steps: int,
    *,
    eval_data: str | None = None,
    use_response_ids: bool = False,
    env: dict[str, str] | None = None,
) -> WorkerConfig:
    """The workers' config of ``config`` (on the driver: a bad DeepSpeed JSON fails here, before
    anything is written). Fields named as in FinetuneConfig are copied from it by name."""
    derived: dict[str, Any] = {
        "use_response_ids": use_response_ids,
        "eval_data": eval_data,
        "total_steps": total_steps,
        "deepspeed_config": deepspeed_config(config),
        "env": dict(env or {}),
    }
    copied = {name: getattr(config, name) for name in WorkerConfig.model_fields if name not in derived}
    return WorkerConfig(**copied, **derived)
