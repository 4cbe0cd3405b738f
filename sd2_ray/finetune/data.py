"""Distilled rows -> token ids for causal-LM fine-tuning (pure: no Ray, no DeepSpeed).

Each row becomes ``prompt ids + response ids + eos``, the prompt rendered with the
tokenizer's chat template (as the drafter will see it at inference), and labels that are
``-100`` on the prompt and on padding, so the loss is only on the answer. Batches are
right-padded with an attention mask of zeros on the padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

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


def encode_row(row: dict[str, Any], tokenizer, seq_len: int, field: str = "response") -> Example:
    """Tokenize one row. Prompt and answer are tokenized apart so the boundary is exact; an
    over-long row loses prompt tokens from the left first (the answer is what is learned),
    then answer tokens from the right."""
    problem = row_error(row, field)
    if problem:
        raise DataError(f"row '{row_id(row)}': {problem}")
    prompt_ids = tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response_of(row, field), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    keep_prompt = max(seq_len - len(answer_ids), min(len(prompt_ids), seq_len // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), keep_prompt):]
    ids = (prompt_ids + answer_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:seq_len]
    return Example(ids, labels)


def encode_rows(rows: Iterable[dict[str, Any]], tokenizer, seq_len: int,
                field: str = "response") -> list[Example]:
    return [encode_row(row, tokenizer, seq_len, field) for row in rows]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rank_slice(rows: Sequence[Any], rank: int, world: int) -> Sequence[Any]:
    """This rank's contiguous part of a global batch (equal parts: the batch size is checked
    to divide). Rank r of W always gets the same rows a 1-worker run puts in the same step."""
    per_rank = len(rows) // world
    return rows[rank * per_rank:(rank + 1) * per_rank]


def micro_batches(rows: Sequence[Any], count: int) -> list[Sequence[Any]]:
    size = len(rows) // count
    return [rows[i * size:(i + 1) * size] for i in range(count)]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (fp32 for stability).

    Summed, not averaged: the caller divides by the step's token count over all workers and
    micro-batches, so 1 and N workers optimise exactly the same objective."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


def labelled_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss after the one-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())
