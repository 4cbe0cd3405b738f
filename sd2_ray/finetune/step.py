"""One fine-tuning step on one worker (pure torch + DeepSpeed, no Ray): this worker's slice of a
global batch encoded into micro-batches, forward and backward through the engine, and the
step's metrics summed over every worker.

Parity: the loss is divided by the step's labelled-token count over all workers (an
all-reduce before the first micro-batch), so 1 and N workers, and any ``grad_accum``, follow
the same loss curve. The pieces it runs on: the loss module
(:mod:`sd2_ray.finetune.loss_module`), the collectives and devices
(:mod:`sd2_ray.finetune.collectives`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune.collectives import all_reduce, engine_device, on_device

if TYPE_CHECKING:
    from sd2_ray.finetune.worker_config import WorkerConfig


def encode_batches(rows: Sequence[dict], tokenizer, worker: WorkerConfig, count: int) -> list[dict[str, torch.Tensor]]:
    """``rows`` as ``count`` collated micro-batches (the target's ids and top-k with use_response_ids)."""
    return [
        D.collate(
            D.encode_rows(chunk, tokenizer, worker.seq_len, worker.response_field, use_ids=worker.use_response_ids),
            tokenizer.pad_token_id,
        )
        for chunk in D.micro_batches(rows, count)
    ]


def train_step(engine, rows: list[dict], tokenizer, worker: WorkerConfig, rank: int, world: int) -> dict:
    """One optimizer step on this worker's slice of a global batch; metrics over all workers:
    ``loss`` (the optimised total per labelled token), ``ce`` (cross-entropy per labelled token)
    and, for a divergence loss, ``kd`` (divergence per position with the target's top-k)."""
    start = time.perf_counter()
    device = engine_device(engine)
    micro = encode_batches(D.rank_slice(rows, rank, world), tokenizer, worker, worker.grad_accum)
    local_labels = sum(D.labelled_tokens(b["labels"]) for b in micro)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    step_labels, _ = all_reduce([local_labels, local_tokens], device)
    # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
    # the mean over every labelled token of the global batch.
    scale = world * worker.grad_accum / max(step_labels, 1.0)
    lr = engine.get_lr()[0]
    sums = [0.0, 0.0, 0.0, 0.0]  # total, ce, kd, kd positions
    for batch in micro:
        summed = engine(**on_device(batch, device))
        engine.backward(summed * scale)
        engine.step()
        last = engine.module.last
        sums = [a + b for a, b in zip(sums, (summed.item(), last.ce, last.kd, last.kd_tokens), strict=True)]
    total, ce, kd, kd_tokens, labels, tokens = all_reduce([*sums, local_labels, local_tokens], device)
    elapsed = time.perf_counter() - start
    out = {
        "loss": total / max(labels, 1.0),
        "ce": ce / max(labels, 1.0),
        "lr": lr,
        "tokens": int(tokens),
        "loss_tokens": int(labels),
        "step_time_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    if engine.module.spec.needs_topk and kd_tokens:
        out.update(kd=kd / kd_tokens, kd_tokens=int(kd_tokens))
    return out
