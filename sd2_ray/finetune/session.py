"""A training worker's setup and persistence, without Ray: load the drafter in the training
dtype, wrap it in a DeepSpeed engine, save and restore ZeRO checkpoints, and write the
gathered HF model dir. The Ray Train loop (:mod:`sd2_ray.finetune.ray_worker`) and the
device smoke (``bench/gpu_smoke.py``) run exactly these.

Memory, per GPU, before ZeRO partitions anything: the drafter is loaded in the dtype it
trains in (bf16 under ``bf16.enabled``), not fp32 (a 3B model: 6.4 GB instead of 12.9 GB;
DeepSpeed would cast it down inside ``deepspeed.initialize`` anyway), and its masks are kept
bit-packed (:class:`sd2_ray.finetune.masking.PackedMask`). The HF save gathers ZeRO-3
partitions one module at a time onto rank 0's CPU (DeepSpeed's consolidated 16-bit state dict),
never the whole model on every GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from sd2_ray.finetune import masking
from sd2_ray.finetune.checkpoint import DS_TAG, LM_PREFIX
from sd2_ray.finetune.deepspeed_config import training_dtype
from sd2_ray.finetune.loss_module import CausalLMLoss
from sd2_ray.finetune.losses import LossSpec
from sd2_ray.finetune.optimizer import client_optimizer, lr_schedule, param_groups
from sd2_ray.finetune.train_state import TrainState

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from sd2_ray.finetune.worker_config import WorkerConfig


def load_drafter(worker: WorkerConfig, device: torch.device, local: str | None = None):
    """(model on ``device`` in train mode and the training dtype, tokenizer, bit-packed masks on
    ``device`` with the masked weights zeroed). The model is placed before the masks are packed,
    so each gradient hook's mask lives on the gradient's device from the start."""
    from sd2_ray.models.io import load_model, load_tokenizer

    local = local or worker.model
    model = load_model(local, dtype=training_dtype(worker.deepspeed_config), device=device).train()
    if worker.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    tokenizer = load_tokenizer(local)
    masks = masking.prepare_masks(local, model, source=worker.model)
    return model, tokenizer, masking.pack_masks(model, masks)


def build_engine(model: PreTrainedModel, worker: WorkerConfig):
    """DeepSpeed engine over the loss module (the drafter is ``engine.module.lm``)."""
    return engine_over(CausalLMLoss(model, LossSpec.from_config(worker)), worker)


def engine_over(wrapped: torch.nn.Module, worker: WorkerConfig):
    """DeepSpeed engine, optimizer and schedule over a loss module whose trained model is ``.lm``
    (a drafter, or a feature head: :class:`sd2_ray.feature.train.FeatureHeadLoss`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the same choice, without its warning per worker
    import deepspeed

    def schedule(optimizer):
        return lr_schedule(optimizer, worker.warmup_steps, worker.total_steps, worker.scheduler, worker.min_lr_ratio)

    groups = param_groups(wrapped, worker.weight_decay)
    optimizer = client_optimizer(groups, worker.optimizer, worker.lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=schedule,
        config=worker.deepspeed_config,
    )
    return engine, scheduler


def save_state(engine, directory: str, state: TrainState, rank: int) -> None:
    """Every rank writes its ZeRO shard (tag ``ds``) into ``directory``; rank 0 the train state."""
    engine.save_checkpoint(directory, tag=DS_TAG)
    if rank == 0:
        state.save(directory)


def load_state(engine, directory: str) -> TrainState:
    """Weights, optimizer and lr schedule from ``directory``; the train state, one restart more."""
    engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = TrainState.load(directory)
    state.restarts += 1
    return state


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The drafter's full 16-bit state dict on rank 0's CPU (None on other ranks; a collective
    under ZeRO-3, gathered module by module), its keys without the loss module's prefix."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 - DeepSpeed's own gather
    elif not dist.is_initialized() or dist.get_rank() == 0:
        state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    else:
        state = None
    if state is None:
        return None
    return {k[len(LM_PREFIX) :]: v for k, v in state.items() if k.startswith(LM_PREFIX)}


def save_hf(engine, tokenizer, directory: str, rank: int) -> None:
    """The drafter as an HF model dir in ``directory`` (written by rank 0; every rank calls)."""
    state = full_state_dict(engine)
    if rank == 0:
        engine.module.lm.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)
