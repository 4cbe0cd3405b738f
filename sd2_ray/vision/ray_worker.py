"""The Ray Train loop of a MASSV drafter (a Ray adapter): the fine-tune stage's loop, with image +
text rows and a LLaVA drafter whose phase decides what learns (:mod:`sd2_ray.vision.massv`).

Shared with :mod:`sd2_ray.finetune.ray_worker`: the WorkerConfig, the DeepSpeed engine (over
the trainable parameters only), gradient masks of a pruned LM, checkpoints and resumption,
reports, held-out selection, the published HF directory. Different: each worker reads its
slice's images itself (data URLs, s3:// or paths), and the held-out check is greedy agreement
with the target's answers (its distilled greedy tokens), turned into an expected chain MAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune import masking
from sd2_ray.finetune import ray_worker as base
from sd2_ray.finetune.collectives import all_reduce, engine_device, on_device
from sd2_ray.finetune.train_state import TrainState
from sd2_ray.finetune.worker_config import WorkerConfig
from sd2_ray.vision import massv

log = logging.getLogger(__name__)


class Encoder:
    """Rows → collated batches for this drafter (its tokenizer, image processor and shape)."""

    def __init__(self, model, tokenizer, worker: WorkerConfig):
        from sd2_ray.vision.images import image_processor

        self.tokenizer, self.worker = tokenizer, worker
        self.processor = image_processor(model.config)
        self.image_token = int(model.config.image_token_id)
        self.patches = int(model.config.image_seq_length)

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        w = self.worker
        batch = massv.batch_of(
            rows, self.tokenizer, self.processor, self.image_token, self.patches, w.seq_len, w.use_response_ids
        )
        if w.massv is not None and not w.massv.images:
            batch.pop("pixel_values", None)  # the control: image positions read as the <image> token
        return batch


def vision_step(engine, rows: list[dict], encode: Encoder, worker: WorkerConfig, rank: int, world: int) -> dict:
    """One optimizer step on this worker's slice of the global batch; metrics over all workers."""
    start = time.perf_counter()
    device = engine_device(engine)
    micro = [encode(chunk) for chunk in D.micro_batches(D.rank_slice(rows, rank, world), worker.grad_accum) if chunk]
    local = sum(D.labelled_tokens(b["labels"]) for b in micro)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    (labels,) = all_reduce([local], device)
    scale = world * worker.grad_accum / max(labels, 1.0)  # undo DeepSpeed's averaging (see finetune.step)
    lr = engine.get_lr()[0]
    sums = np.zeros(2)
    for batch in micro:
        summed = engine(**on_device(batch, device))
        engine.backward(summed * scale)
        engine.step()
        sums += [engine.module.last["ce"], engine.module.last["hits"]]
    ce, hits, counted, all_tokens = all_reduce([*sums.tolist(), local, tokens], device)
    elapsed = time.perf_counter() - start
    return {
        "loss": ce / max(counted, 1.0),
        "ce": ce / max(counted, 1.0),
        "accuracy": hits / max(counted, 1.0),
        "lr": lr,
        "tokens": int(all_tokens),
        "loss_tokens": int(counted),
        "step_time_s": elapsed,
        "tokens_per_s": all_tokens / elapsed if elapsed > 0 else 0.0,
    }


def heldout(worker: WorkerConfig, encode: Encoder, rank: int, world: int) -> list[tuple[dict, bool]]:
    """This rank's held-out rows as (batch, counted) pairs, the same number on every rank."""
    if not worker.eval_every or not worker.eval_data:
        return []
    from sd2_ray import storage

    rows = storage.read_parquet(worker.eval_data).to_pylist()
    per_rank = -(-len(rows) // world)
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    size = max(1, worker.batch_size // (world * worker.grad_accum))
    return [(encode(mine[i : i + size] or rows[:1]), bool(mine[i : i + size])) for i in range(0, per_rank, size)]


def evaluate(engine, batches: list[tuple[dict, bool]], worker: WorkerConfig) -> dict[str, Any]:
    """Held-out loss and greedy agreement → expected MAL at K (a collective: all ranks call it)."""
    device = engine_device(engine)
    sums = np.zeros(3)
    engine.eval()
    try:
        with torch.no_grad():
            for batch, scored in batches:
                engine(**on_device(batch, device))
                if scored:
                    last = engine.module.last
                    sums += [last["ce"], last["tokens"], last["hits"]]
    finally:
        engine.train()
    ce, counted, hits = all_reduce(sums.tolist(), device)
    agreement = hits / max(counted, 1.0)
    return {
        "eval_loss": ce / max(counted, 1.0),
        "eval_ce": ce / max(counted, 1.0),
        "eval_agreement": agreement,
        "expected_mal": massv.expected_mal([agreement], worker.num_speculative_tokens),
        "eval_positions": int(counted),
    }


def load(worker: WorkerConfig, device: torch.device):
    """(drafter on ``device`` in the training dtype, trainable per phase; tokenizer; packed masks)."""
    from sd2_ray.finetune.deepspeed_config import training_dtype
    from sd2_ray.models.io import load_model, load_tokenizer

    assert worker.massv is not None, "a MASSV loop needs the massv settings"
    local = base._resolve_model(worker.model)  # noqa: SLF001 - the stage's one fetch helper
    model = load_model(local, dtype=training_dtype(worker.deepspeed_config), device=device).train()
    model.config.use_cache = False
    massv.set_trainable(model, worker.massv.phase)
    masks = masking.prepare_masks(local, model, source=worker.model)
    return model, load_tokenizer(local), masking.pack_masks(model, masks)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker of a MASSV phase."""
    import ray.train

    from sd2_ray.finetune.session import engine_over

    started = base.worker_start(loop_config)
    if started is None:
        return
    worker, rank, world, checkpoint = started
    model, tokenizer, masks = load(worker, base.worker_device(worker))
    phase = worker.massv.phase if worker.massv is not None else "instruct"
    if worker.enforce_masks and masks and phase == "instruct":  # phase 1: the LM is frozen
        masking.register_gradient_masks(model, masks)  # before deepspeed.initialize (see masking)
    engine, _ = engine_over(massv.VisionLMLoss(model), worker)
    state = base.restore(engine, checkpoint) if checkpoint is not None else TrainState()
    encode = Encoder(model, tokenizer, worker)
    evals = heldout(worker, encode, rank, world)
    shard = ray.train.get_dataset_shard("train")
    metrics = base.train_epochs(
        engine,
        state,
        worker,
        lambda epoch: base.global_batches(shard, worker, epoch),
        lambda rows: vision_step(engine, rows, encode, worker, rank, world),
        evals,
        masks,
        rank,
        world,
        evaluate,
    )
    metrics = dict(metrics, masked_nonzero=masking.count_masked_nonzero(engine.module.lm, masks), final=True)
    state.finished = True
    if rank == 0 and state.history:
        state.history[-1]["masked_nonzero"] = metrics["masked_nonzero"]
    base.save_final(engine, tokenizer, state, base.scored(metrics, state, worker), rank)
