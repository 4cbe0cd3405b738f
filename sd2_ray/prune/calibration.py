"""Calibration data: distilled rows (or prompt rows) -> token tensors the pruners run on.

Each row becomes one sample: its conversation with the (distilled) response as the assistant
turn, rendered with the model's chat template, so the drafter is calibrated on exactly the
text the target produced. Rows without a response contribute their prompt alone. Samples are
cut to ``seq_len`` tokens and kept unpadded (batch size 1): no attention-mask corner cases.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from sd2_ray import manifest, storage
from sd2_ray.errors import DataError
from sd2_ray.rows import instruction_messages, read_rows, reference_response, render_prompt, row_problem

log = logging.getLogger(__name__)


def calibration_files(path: str) -> list[str]:
    """The data files of a calibration source: one file, or a directory's Parquet shards
    (else its JSONL files). Side files of a stage output (manifest.json, config.yaml) are skipped."""
    if storage.is_file(path):
        return [path]
    if not storage.is_dir(path):
        raise DataError(f"calibration: {path}: not found")
    files = [f for f in storage.list_files(path, recursive=True) if "/_" not in f and "/." not in f]
    parquet = [f for f in files if f.endswith(".parquet")]
    chosen = parquet or [f for f in files if f.endswith(".jsonl")]
    if not chosen:
        raise DataError(f"calibration: {path}: directory has no .parquet or .jsonl files")
    state = manifest.read(path)
    if state is not None and state.get("status") != manifest.COMPLETE:
        raise DataError(f"calibration: {path}: manifest says '{state.get('status')}', not complete")
    return chosen


def load_rows(path: str, num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_samples`` usable rows, drawn with a fixed seed (all of them if there are fewer)."""
    rows: list[dict[str, Any]] = []
    for file in calibration_files(path):
        rows.extend(read_rows(file))
    usable = [r for r in rows if row_problem(r) is None and not r.get("error")]  # failed distill rows
    if len(usable) < len(rows):
        log.warning("calibration: skipped %d unusable rows of %s", len(rows) - len(usable), path)
    if not usable:
        raise DataError(f"calibration: {path}: no usable rows (need prompt or messages)")
    random.Random(seed).shuffle(usable)
    if len(usable) < num_samples:
        log.warning("calibration: %s has %d usable rows, fewer than num_samples=%d", path, len(usable), num_samples)
    return usable[:num_samples]


def render_sample(row: dict[str, Any], tokenizer) -> str:
    """Prompt plus response as one conversation, in the model's chat template when it has one."""
    response = reference_response(row)
    if getattr(tokenizer, "chat_template", None):
        messages = instruction_messages(row)
        if response is None:
            return render_prompt(row, tokenizer)
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return render_prompt(row, tokenizer) + (response or "")


def tokenize_samples(texts: list[str], tokenizer, seq_len: int) -> list[torch.Tensor]:
    """One ``[1, T]`` LongTensor per text, ``T <= seq_len``; empty texts are dropped."""
    from sd2_ray.models.tokens import encode_rendered

    batches = []
    for text in texts:
        ids = encode_rendered(text, tokenizer)[:seq_len]
        if len(ids) >= 2:
            batches.append(torch.tensor([ids], dtype=torch.long))
    return batches


def load_calibration(
    path: str, tokenizer, num_samples: int, seq_len: int, seed: int = 0
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """(token batches, description for sparsity.json) from a calibration dataset."""
    rows = load_rows(path, num_samples, seed)
    batches = tokenize_samples([render_sample(r, tokenizer) for r in rows], tokenizer, seq_len)
    if not batches:
        raise DataError(f"calibration: {path}: every sample is shorter than 2 tokens")
    info = {
        "source": path,
        "num_samples": len(batches),
        "seq_len": seq_len,
        "seed": seed,
        "tokens": int(sum(b.numel() for b in batches)),
        "with_response": sum(reference_response(r) is not None for r in rows),
    }
    log.info("calibration: %d samples, %d tokens from %s", info["num_samples"], info["tokens"], path)
    return batches, info
