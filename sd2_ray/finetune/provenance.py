"""Whose token ids the distilled rows hold, and whether the drafter may learn them (no Ray).

``sd2 distill`` stores the target's ids (``response_ids``) and, with top-k, the target's
distribution over its own vocabulary. Another family's ids all fall inside a larger vocabulary,
so training on them fails nowhere and teaches nothing: every fine-tune decides here, on the
driver and before anything is written, which ids it trains on. The distill manifest names the
tokenizer the ids are in (:func:`sd2_ray.models.tokens.tokenizer_identity`); data without that
record (older runs, hand-made files) is checked by decoding a sample of its ids with the drafter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.errors import ConfigError
from sd2_ray.finetune.config import FinetuneConfig, topk_needs

log = logging.getLogger(__name__)

SAMPLE_ROWS = 16  # rows decoded when no manifest names the tokenizer


@dataclass
class Verdict:
    """Whether the rows' ids are the drafter's own (None: no row carries ids), and why."""

    same: bool | None
    why: str


def recorded_tokenizer(data: str) -> dict[str, Any] | None:
    """The tokenizer the distill manifest of ``data`` names (the data dir's manifest, or that of
    the directory a single data file lies in); None when no manifest names one."""
    for where in [data] if storage.is_dir(data) else [storage.parent(data)]:
        recorded = (manifest.read(where) or {}).get("tokenizer")
        if isinstance(recorded, dict) and recorded.get("fingerprint"):
            return recorded
    return None


def decodes_to_text(rows: Sequence[dict[str, Any]], tokenizer, sample: int = SAMPLE_ROWS) -> bool | None:
    """Whether ``tokenizer`` decodes the first ``sample`` rows' ids back to their response text;
    None when no row has both."""
    checked = 0
    for row in rows:
        ids, text = row.get("response_ids"), row.get("response")
        if ids is None or not len(ids) or not isinstance(text, str):
            continue
        if tokenizer.decode([int(t) for t in ids], skip_special_tokens=True).strip() != text.strip():
            return False
        checked += 1
        if checked >= sample:
            break
    return True if checked else None


def judge(data: str, rows: Sequence[dict[str, Any]], tokenizer) -> Verdict:
    from sd2_ray.models.tokens import tokenizer_identity

    if not any(row.get("response_ids") is not None for row in rows):
        return Verdict(None, "no row has response_ids")
    recorded = recorded_tokenizer(data)
    if recorded is None:
        same = decodes_to_text(rows, tokenizer)
        return Verdict(
            same,
            "the drafter decodes them back to the response text"
            if same
            else "the drafter does not decode them back to the response text",
        )
    mine = tokenizer_identity(tokenizer)
    same = mine["fingerprint"] == recorded["fingerprint"]
    relation = "is" if same else "is not"
    return Verdict(
        same,
        f"they are in the tokenizer of {recorded.get('name')} ({recorded.get('vocab_size')} "
        f"tokens), which {relation} the drafter's ({mine['vocab_size']} tokens)",
    )


def use_response_ids(config: FinetuneConfig, rows: Sequence[dict[str, Any]], tokenizer) -> bool:
    """Whether the workers train on ``response_ids``; a one-line ConfigError naming the field when
    the config asks for ids (or the target's top-k) that belong to another tokenizer."""
    if config.response_field != "response" or config.use_response_ids is False:
        return False
    verdict = judge(config.data, rows, tokenizer)
    if verdict.same is not False:
        return True
    if config.use_response_ids:
        raise ConfigError(
            f"field 'use_response_ids': the data's response_ids belong to another tokenizer "
            f"({verdict.why}); unset it or set it false to train on the response text in the "
            "drafter's tokens"
        )
    for field, what in topk_needs(config):
        raise ConfigError(
            f"field '{field}': {what} needs a drafter with the target's tokenizer (the stored "
            f"top-k are the target's token ids; {verdict.why}); use loss ce across tokenizers"
        )
    log.info(
        "finetune: the response_ids are not the drafter's (%s); training on the response text re-tokenised", verdict.why
    )
    return False


def drafter_tokenizer(config: FinetuneConfig):
    """The drafter's tokenizer, read on the driver without its weights."""
    from sd2_ray.models.io import load_tokenizer, model_metadata_dir

    return load_tokenizer(model_metadata_dir(config.model))
