"""Distilled rows -> token ids for causal-LM fine-tuning (pure: no Ray, no DeepSpeed).

Each row becomes ``prompt ids + response ids + eos``, the prompt rendered with the
tokenizer's chat template (as the drafter will see it at inference), and labels that are
``-100`` on the prompt and on padding, so the loss is only on the answer. Batches are
right-padded with an attention mask of zeros on the padding.

With ``use_ids`` a distilled row's answer is the exact token ids the target produced
(``response_ids``, its EOS included when it stopped on one; see :mod:`sd2_ray.distill.core`)
instead of its re-tokenised text, and the target's stored top-k (``topk_ids`` /
``topk_logprobs``, one list per response token) travels along, aligned with the labels, for
the distillation losses (:mod:`sd2_ray.finetune.losses`). That needs the drafter to share the
target's tokenizer (SD²'s same-family drafters do). Rows without ids (a rewrite that kept the
reference answer, older data) take the text path and carry no top-k.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sd2_ray.errors import DataError
from sd2_ray.rows import reference_response, render_prompt, row_id, row_problem

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized row: ``labels`` is ``IGNORE_INDEX`` wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    # the target's top-k per answer token, (n, k); row j belongs to input position topk_start + j
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_start: int = 0

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def response_of(row: dict[str, Any], field: str = "response") -> str | None:
    """The answer to train on: ``row[field]``; for the default field also a trailing
    assistant message (prompt files carry references that way)."""
    value = row.get(field)
    if isinstance(value, str) and value:
        return value
    if field == "response":
        ref = reference_response(row)
        return ref or None
    return None


def row_error(row: dict[str, Any], field: str = "response") -> str | None:
    """Why a row cannot be trained on, or None."""
    problem = row_problem(row)
    if problem:
        return problem
    if response_of(row, field) is None:
        return f"row has no '{field}'"
    return None


def answer_of(row: dict[str, Any], tokenizer, field: str, use_ids: bool):
    """(answer ids, top-k ids, top-k log-probs): the target's stored ids and distribution when
    asked for and present, else the text tokenised + EOS (and no top-k)."""
    ids = row.get("response_ids") if use_ids and field == "response" else None
    if ids is not None and len(ids):
        answer = [int(t) for t in ids]
        topk = row.get("topk_ids")
        if topk is None or row.get("topk_logprobs") is None:
            return answer, None, None
        topk_ids, topk_lp = _matrix(topk, torch.int32), _matrix(row["topk_logprobs"], torch.float32)
        if topk_ids.shape[0] != len(answer) or topk_lp.shape != topk_ids.shape:
            raise DataError(
                f"row '{row_id(row)}': topk_ids/topk_logprobs must have one list per "
                f"response id ({len(answer)}), got {tuple(topk_ids.shape)} / {tuple(topk_lp.shape)}"
            )
        return answer, topk_ids, topk_lp
    answer = tokenizer(response_of(row, field), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    return answer, None, None


def _matrix(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A list of equal-length lists (or arrays of arrays, as pandas gives them) as an (n, k) tensor."""
    import numpy as np

    if len(value) == 0:
        return torch.zeros((0, 0), dtype=dtype)
    return torch.from_numpy(np.stack([np.asarray(v) for v in value])).to(dtype)


def encode_row(row: dict[str, Any], tokenizer, seq_len: int, field: str = "response", use_ids: bool = False) -> Example:
    """Tokenize one row. Prompt and answer are tokenized apart so the boundary is exact; an
    over-long row loses prompt tokens from the left first (the answer is what is learned),
    then answer tokens from the right (with their top-k)."""
    problem = row_error(row, field)
    if problem:
        raise DataError(f"row '{row_id(row)}': {problem}")
    prompt_ids = tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"]
    answer_ids, topk_ids, topk_lp = answer_of(row, tokenizer, field, use_ids)
    keep_prompt = max(seq_len - len(answer_ids), min(len(prompt_ids), seq_len // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), keep_prompt) :]
    ids = (prompt_ids + answer_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:seq_len]
    if topk_ids is None:
        return Example(ids, labels)
    kept = len(ids) - len(prompt_ids)
    return Example(ids, labels, topk_ids[:kept], topk_lp[:kept], len(prompt_ids))


def encode_rows(
    rows: Iterable[dict[str, Any]], tokenizer, seq_len: int, field: str = "response", use_ids: bool = False
) -> list[Example]:
    return [encode_row(row, tokenizer, seq_len, field, use_ids) for row in rows]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels``; when any
    example has the target's top-k, also ``topk_ids`` / ``topk_logprobs`` (B, W, k) and
    ``topk_mask`` (B, W), true where a position holds a stored top-k."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    top_ks = [e.topk_ids.shape[1] for e in examples if e.topk_ids is not None and e.topk_ids.numel()]
    if top_ks:
        batch.update(collate_topk(examples, width, top_ks[0]))
    return batch


def collate_topk(examples: Sequence[Example], width: int, k: int) -> dict[str, torch.Tensor]:
    topk_ids = torch.zeros((len(examples), width, k), dtype=torch.long)
    topk_lp = torch.zeros((len(examples), width, k), dtype=torch.float32)
    topk_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        if e.topk_ids is None or not e.topk_ids.numel():
            continue
        if e.topk_ids.shape[1] != k:
            raise DataError(f"rows of one batch store different top-k sizes ({k} and {e.topk_ids.shape[1]})")
        assert e.topk_logprobs is not None, "an example's top-k ids come with their log-probs"
        span = slice(e.topk_start, e.topk_start + e.topk_ids.shape[0])
        topk_ids[i, span] = e.topk_ids.long()
        topk_lp[i, span] = e.topk_logprobs
        topk_mask[i, span] = True
    return {"topk_ids": topk_ids, "topk_logprobs": topk_lp, "topk_mask": topk_mask}


def rank_slice(rows: Sequence[Any], rank: int, world: int) -> Sequence[Any]:
    """This rank's contiguous part of a global batch (equal parts: the batch size is checked
    to divide). Rank r of W always gets the same rows a 1-worker run puts in the same step."""
    per_rank = len(rows) // world
    return rows[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(rows: Sequence[Any], count: int) -> list[Sequence[Any]]:
    size = len(rows) // count
    return [rows[i * size : (i + 1) * size] for i in range(count)]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (fp32 for stability).

    Summed, not averaged: the caller divides by the step's token count over all workers and
    micro-batches, so 1 and N workers optimise exactly the same objective."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def labelled_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss after the one-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())
