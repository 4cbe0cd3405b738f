"""Held-out acceptance while training, and the checkpoint it selects (pure torch + DeepSpeed).

Every ``eval_every`` steps (and at the last step) each worker scores its share of the held-out
distilled rows teacher-forced, under ``no_grad``, through the same engine forward as training
(:class:`sd2_ray.finetune.loss_module.CausalLMLoss` with ``acceptance_k``): the configured loss and
the acceptance sums of :mod:`sd2_ray.finetune.acceptance`. The sums are all-reduced on the
engine's device and summarised into metrics (``eval_loss``, ``expected_mal``, ``alpha``, ...).

Selection (``select_by``): ``loss`` keeps the step with the lowest ``eval_loss``,
``expected_mal`` the highest ``expected_mal`` (ties: the later step). An eval step that
matches or improves it forces a checkpoint, scored so that Ray Train's checkpoint manager
keeps it (``select_score``: the oriented value; every other checkpoint gets :data:`UNSCORED`,
and the latest is always kept for resumption). The driver publishes that step's weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune.acceptance import SUM_KEYS, summarize
from sd2_ray.finetune.collectives import all_reduce, engine_device, on_device
from sd2_ray.finetune.train_state import TrainState

if TYPE_CHECKING:
    from sd2_ray.finetune.worker_config import WorkerConfig

# select_by -> (metric, better direction)
SELECTION = {"loss": ("eval_loss", "min"), "expected_mal": ("expected_mal", "max")}
SCORE_KEY = "select_score"
# A finite floor, not -inf: Ray Train writes checkpoint metrics into a JSON snapshot and reads
# them back to rank checkpoints, and an infinity does not survive that round trip.
UNSCORED = -1.0e30
LOSS_KEYS = ("total", "ce", "kd", "ce_tokens", "kd_tokens")


def eval_due(every: int | None, step: int, total: int) -> bool:
    """Whether step ``step`` of ``total`` is scored on the held-out rows (every ``every`` steps
    and at the last one; never without ``every``)."""
    if not every:
        return False
    return step % every == 0 or step == total


def heldout_batches(
    rows: list[dict], tokenizer, worker: WorkerConfig, rank: int, world: int
) -> list[tuple[dict, bool]]:
    """This rank's share of the held-out rows as (collated micro-batch, counted) pairs, the same
    number on every rank: under ZeRO-3 a forward gathers parameters from every rank, so a rank
    whose share ran out still runs one row that is not counted."""
    if not rows:
        return []
    per_rank = -(-len(rows) // world)
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    size = max(1, worker.batch_size // (world * worker.grad_accum))  # training's micro-batch
    out = []
    for start in range(0, per_rank, size):
        part = mine[start : start + size]
        examples = D.encode_rows(
            part or rows[:1],
            tokenizer,
            worker.seq_len,
            worker.response_field,
            use_ids=worker.use_response_ids,
        )
        out.append((D.collate(examples, tokenizer.pad_token_id), bool(part)))
    return out


def evaluate(engine, batches: list[tuple[dict, bool]], worker: WorkerConfig) -> dict[str, Any]:
    """Held-out loss and acceptance over every rank's batches (a collective: all ranks call it)."""
    device = engine_device(engine)
    module = engine.module
    loss = dict.fromkeys(LOSS_KEYS, 0.0)
    acc = dict.fromkeys(SUM_KEYS, 0.0)
    engine.eval()
    try:
        with torch.no_grad():
            for batch, counted in batches:
                engine(**on_device(batch, device), acceptance_k=worker.num_speculative_tokens)
                if counted:
                    last = module.last
                    for key, value in zip(
                        LOSS_KEYS, (float(last.total), last.ce, last.kd, last.ce_tokens, last.kd_tokens), strict=True
                    ):
                        loss[key] += value
                    for key in SUM_KEYS:
                        acc[key] += module.last_acceptance[key]
    finally:
        engine.train()
    reduced = all_reduce([loss[k] for k in LOSS_KEYS] + [acc[k] for k in SUM_KEYS], device)
    loss = dict(zip(LOSS_KEYS, reduced[: len(LOSS_KEYS)], strict=True))
    acc = dict(zip(SUM_KEYS, reduced[len(LOSS_KEYS) :], strict=True))
    tokens = max(loss["ce_tokens"], 1.0)
    out: dict[str, Any] = {"eval_loss": loss["total"] / tokens, "eval_ce": loss["ce"] / tokens}
    if module.spec.needs_topk and loss["kd_tokens"]:
        out["eval_kd"] = loss["kd"] / loss["kd_tokens"]
    summary = summarize(acc, worker.kd_temperature)
    if summary["positions"]:
        out.update(
            {k: v for k, v in summary.items() if k not in ("positions", "rows")},
            eval_positions=summary["positions"],
            eval_rows=summary["rows"],
        )
    return out


def update_best(state: TrainState, metrics: dict[str, Any], select_by: str) -> bool:
    """Record this step as the best when its eval is at least as good as the best so far; True
    if so. A tie goes to the later step: greedy expected MAL on a few held-out rows moves in
    discrete steps and often repeats, and at an equal score the longer-trained model is the
    one measured MAL favoured (bench/bench_kd.py: a plateau of three equal evals)."""
    name, mode = SELECTION[select_by]
    value = metrics.get(name)
    if value is None or not math.isfinite(value):
        return False
    best = state.best
    if best is not None and not (value >= best["value"] if mode == "max" else value <= best["value"]):
        return False
    state.best = {"step": state.step, "metric": name, "value": float(value)}
    return True


def checkpoint_score(state: TrainState, select_by: str) -> float:
    """``select_score`` of a checkpoint saved now: the best's value, oriented so higher is better,
    when this step is the best so far; else :data:`UNSCORED`."""
    best = state.best
    if best is None or best["step"] != state.step:
        return UNSCORED
    return best["value"] if SELECTION[select_by][1] == "max" else -best["value"]
