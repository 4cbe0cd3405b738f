"""The Ray Train loop of a feature head (a Ray adapter): the fine-tune stage's loop, with streamed
feature rows instead of token rows and a head instead of a drafter.

What it shares with :mod:`sd2_ray.finetune.ray_worker`: the :class:`WorkerConfig`, the DeepSpeed
engine (:func:`sd2_ray.finetune.session.engine_over`), checkpoints and resumption, reports,
held-out selection. What differs: each worker gets its own split of the feature stream (the
target's features are computed once per row and epoch, never by every worker), the loss is the
head's (:class:`sd2_ray.feature.train.FeatureHeadLoss`, divided by the step's counted positions
over all workers), the held-out check measures chain acceptance (expected MAL, greedy), and the
final model is the head's own directory (config + weights only).

Resumption: a resumed epoch skips as many batches as were trained before the restart, not
necessarily the same rows (Ray Data's split hands blocks to whichever worker asks first).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from sd2_ray.feature import train as T
from sd2_ray.finetune import data as D
from sd2_ray.finetune import ray_worker as base
from sd2_ray.finetune.checkpoint import FINAL_CHECKPOINT, MODEL_SUBDIR
from sd2_ray.finetune.collectives import all_reduce, engine_device, on_device
from sd2_ray.finetune.train_state import TrainState
from sd2_ray.finetune.worker_config import WorkerConfig

log = logging.getLogger(__name__)


def build_head(worker: WorkerConfig, device: torch.device):
    """(the head on ``device`` in the training dtype, its loss module). The target lends only its
    embedding and LM head, read alone from its files."""
    from transformers import AutoConfig

    from sd2_ray.feature.extract import load_target_parts
    from sd2_ray.feature.head import FeatureHead
    from sd2_ray.finetune.deepspeed_config import training_dtype

    settings = worker.feature_head
    assert settings is not None, "a feature head's loop needs the feature_head settings"
    local = base._resolve_model(worker.model)  # noqa: SLF001 - the stage's one fetch helper
    dtype = training_dtype(worker.deepspeed_config)
    parts = load_target_parts(local, dtype=dtype, device=device)
    config = settings.head_config(AutoConfig.from_pretrained(local))
    head = FeatureHead(config, parts).to(device=device, dtype=dtype).train()
    return T.FeatureHeadLoss(head, settings.feature_weight, settings.token_weight, settings.ttt_steps)


def rows_of(batch: dict[str, Any]) -> list[dict]:
    """A numpy batch of the stream (ragged columns as object arrays) as row dicts."""
    names = list(batch)
    return [{name: batch[name][i] for name in names} for i in range(len(batch[names[0]]))]


def local_batches(shard, worker: WorkerConfig, world: int):
    """This worker's rows of each global batch: its split of the stream, batch_size / world at a time."""
    per_worker = worker.batch_size // world
    for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True):
        yield rows_of(batch)


def counted_positions(batch: dict[str, torch.Tensor], steps: int) -> int:
    return sum(int(T.step_mask(batch, t).sum()) for t in range(steps + 1))


def feature_step(engine, rows: list[dict], worker: WorkerConfig) -> dict:
    """One optimizer step on this worker's rows; metrics over all workers."""
    start = time.perf_counter()
    device = engine_device(engine)
    ttt = worker.feature_head.ttt_steps if worker.feature_head else 0
    micro = [T.collate(chunk) for chunk in D.micro_batches(rows, worker.grad_accum) if chunk]
    local = sum(counted_positions(b, ttt) for b in micro)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    (positions,) = all_reduce([local], device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    scale = world * worker.grad_accum / max(positions, 1.0)  # undo DeepSpeed's averaging (see step.py)
    lr = engine.get_lr()[0]
    sums = np.zeros(4)
    for batch in micro:
        summed = engine(**on_device(batch, device))
        engine.backward(summed * scale)
        engine.step()
        last = engine.module.last
        sums += [last["feature"], last["token"], last["correct"], last["positions"]]
    feature, token, correct, counted, all_tokens = all_reduce([*sums.tolist(), tokens], device)
    elapsed = time.perf_counter() - start
    settings = worker.feature_head
    assert settings is not None
    per = max(counted, 1.0)
    return {
        "loss": (settings.feature_weight * feature + settings.token_weight * token) / per,
        "feature_loss": feature / per,
        "token_loss": token / per,
        "accuracy": correct / per,
        "lr": lr,
        "tokens": int(all_tokens),
        "loss_tokens": int(counted),
        "step_time_s": elapsed,
        "tokens_per_s": all_tokens / elapsed if elapsed > 0 else 0.0,
    }


def heldout_feature_batches(worker: WorkerConfig, rank: int, world: int) -> list[tuple[dict, bool]]:
    """This rank's held-out feature rows (the driver's ``eval`` dataset, read whole), as
    (batch, counted) pairs, the same number on every rank (see finetune.heldout)."""
    import ray.train

    if not worker.eval_every:
        return []
    shard = ray.train.get_dataset_shard("eval")
    if shard is None:
        return []
    rows = [row for batch in shard.iter_batches(batch_format="numpy") for row in rows_of(batch)]
    rows.sort(key=lambda r: str(r["row_id"]))  # the same order on every rank
    per_rank = -(-len(rows) // world)
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    size = max(1, worker.batch_size // (world * worker.grad_accum))
    return [(T.collate(mine[i : i + size] or rows[:1]), bool(mine[i : i + size])) for i in range(0, per_rank, size)]


def evaluate(engine, batches: list[tuple[dict, bool]], worker: WorkerConfig) -> dict[str, Any]:
    """Held-out loss and greedy chain acceptance at K (a collective: all ranks call it)."""
    device = engine_device(engine)
    k = worker.num_speculative_tokens
    sums = np.zeros(3 + k)  # loss, positions, chains, accepted per chain position
    engine.eval()
    try:
        with torch.no_grad():
            for batch, counted in batches:
                on = on_device(batch, device)
                loss = float(engine(**on))
                acc = T.chain_acceptance(engine.module.lm, on, k)
                per_position: list[float] = acc["per_position"]
                if counted:
                    sums += [loss, engine.module.last["positions"], acc["chains"], *per_position]
    finally:
        engine.train()
    loss, positions, chains, *per_position = all_reduce(sums.tolist(), device)
    chains = max(chains, 1.0)
    return {
        "eval_loss": loss / max(positions, 1.0),
        "expected_mal": 1.0 + sum(per_position) / chains,
        "acceptance_by_position": [p / chains for p in per_position],
        "eval_positions": int(positions),
    }


def save_final(engine, config, state: TrainState, metrics: dict, rank: int) -> None:
    """Rank 0 writes the head's directory (config + weights, gathered under ZeRO-3) into the
    final checkpoint; every rank calls (the gather is a collective)."""
    import ray.train
    from safetensors.torch import save_file

    from sd2_ray.feature.head import WEIGHTS_NAME, save_config
    from sd2_ray.finetune.session import full_state_dict

    weights = full_state_dict(engine)
    with tempfile.TemporaryDirectory(prefix="sd2-final-") as tmp:
        checkpoint = None
        if rank == 0:
            model_dir = os.path.join(tmp, MODEL_SUBDIR)
            os.makedirs(model_dir)
            save_config(config, model_dir)
            save_file({k: v.contiguous() for k, v in (weights or {}).items()}, os.path.join(model_dir, WEIGHTS_NAME))
            state.save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=FINAL_CHECKPOINT)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker of a feature head's fine-tune."""
    import ray.train

    from sd2_ray.finetune.session import engine_over

    started = base.worker_start(loop_config)
    if started is None:
        return
    worker, rank, world, checkpoint = started
    module = build_head(worker, base.worker_device(worker))
    engine, _ = engine_over(module, worker)
    state = base.restore(engine, checkpoint) if checkpoint is not None else TrainState()
    evals = heldout_feature_batches(worker, rank, world)
    shard = ray.train.get_dataset_shard("train")
    metrics = base.train_epochs(
        engine,
        state,
        worker,
        lambda epoch: local_batches(shard, worker, world),  # each epoch streams the split anew
        lambda rows: feature_step(engine, rows, worker),
        evals,
        {},
        rank,
        world,
        evaluate,
    )
    state.finished = True
    metrics = dict(metrics, masked_nonzero=0, final=True)
    save_final(engine, module.lm.config, state, base.scored(metrics, state, worker), rank)
