"""MASSV's two training phases over a LLaVA drafter (pure torch, no Ray): what each phase
trains, the rows as model inputs, the loss, and the held-out check.

- ``projector`` (phase 1): only the projector learns, on image–caption pairs; the vision tower
  (the target's) and the LM stay exactly as they were, so the LM's text skills and its sparsity
  are untouched while it learns to read the target's image features.
- ``instruct`` (phase 2, self-distilled visual instruction tuning): the projector and the LM
  learn the target VLM's own answers to image + question prompts; the tower stays frozen. A
  pruned LM keeps its masks (the fine-tune stage's gradient masks, unchanged).

A drafter is built from a text LM and the target VLM (:func:`init_drafter`) before phase 1: its
masks, if the text LM was pruned, are renamed to the LLaVA model's parameter names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from sd2_ray.vision import data as VD
from sd2_ray.vision import images as I

PHASES = ("projector", "instruct")
LM_PREFIX = "model.language_model."  # where a text LM's "model.*" weights sit in a LLaVA model


def set_trainable(vlm, phase: str) -> None:
    """requires_grad per phase: projector only, or projector + LM (never the vision tower)."""
    for name, p in vlm.named_parameters():
        in_projector = "multi_modal_projector" in name
        in_lm = name.startswith(LM_PREFIX) or name.startswith("lm_head")
        p.requires_grad_(in_projector or (phase == "instruct" and in_lm))


class VisionLMLoss(torch.nn.Module):
    """The drafter (``.lm``) and its summed cross-entropy over the labelled tokens; ``last``
    holds the batch's sums (ce, labelled tokens, greedy hits) for the step's metrics."""

    def __init__(self, vlm):
        super().__init__()
        self.lm = vlm
        self.last: dict[str, float] = {}

    def forward(self, input_ids, labels, attention_mask, pixel_values=None):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]
        counted = targets != -100
        loss = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        hits = (shifted.argmax(-1) == targets) & counted
        self.last = {"ce": float(loss.detach()), "tokens": float(counted.sum()), "hits": float(hits.sum())}
        self.last_hits = hits.detach()
        return loss


def encode_row(row: dict[str, Any], tokenizer, image_token: int, patches: int, seq_len: int, use_ids: bool) -> dict:
    """One row as ``input_ids``/``labels`` (the prompt with its image blocks, then the answer:
    the target's stored ids when ``use_ids``, else the text + EOS), cut to ``seq_len``; the
    prompt must fit whole (its image blocks cannot be cut)."""
    from sd2_ray.errors import DataError
    from sd2_ray.finetune.data import answer_of

    refs = VD.image_refs(row)
    prompt = VD.prompt_ids(tokenizer, list(row["messages"]), len(refs), image_token, patches)
    if len(prompt) >= seq_len:
        raise DataError(
            f"row '{row.get('id')}': its prompt ({len(prompt)} tokens with images) does not fit seq_len {seq_len}"
        )
    answer, _, _ = answer_of(row, tokenizer, "response", use_ids)
    ids = (prompt + answer)[:seq_len]
    labels = ([-100] * len(prompt) + answer)[:seq_len]
    return {"input_ids": ids, "labels": labels, "images": refs}


def batch_of(rows: Sequence[dict], tokenizer, processor, image_token: int, patches: int, seq_len: int, use_ids: bool):
    """Rows as one collated batch with their images' pixel values (images read here, in the
    worker: data URLs, s3:// or paths)."""
    encoded = [encode_row(r, tokenizer, image_token, patches, seq_len, use_ids) for r in rows]
    refs = [ref for e in encoded for ref in e["images"]]
    pixels = I.pixel_values([I.load_image(ref) for ref in refs], processor) if refs else []
    return VD.collate(encoded, tokenizer.pad_token_id, list(pixels))


def expected_mal(hit_rates: list[float], k: int) -> float:
    """Greedy chain MAL at K from teacher-forced agreement with the target's answers (its
    distilled greedy tokens): 1 + Σ_j Π_{i≤j} α, α the per-token agreement."""
    from sd2_ray.finetune.acceptance import expected_mal_iid

    alpha = sum(hit_rates) / max(len(hit_rates), 1)
    return float(expected_mal_iid(torch.tensor(alpha), k))


def init_drafter(text_dir: str, target_dir: str, out: str, seed: int = 0) -> str:
    """A MASSV drafter in ``out``: the target VLM's vision tower, a fresh projector, the text LM
    of ``text_dir`` (a pruned LM's masks carried over under the LLaVA names). Returns ``out``."""
    from safetensors.torch import save_file

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.models.sparsity import MASKS_FILE, load_masks
    from sd2_ray.vision.model import build_drafter, load_vlm, save_vlm

    target = load_vlm(target_dir)
    tokenizer = load_tokenizer(target_dir)  # the target's: the text tokenizer plus <image>
    text = load_model(text_dir)
    masks = load_masks(text_dir, text)
    drafter = build_drafter(text, target, tokenizer, seed=seed)
    save_vlm(drafter, tokenizer, out)
    if masks:
        # the masks file alone (not sparsity.json, whose layer names are the text LM's)
        renamed = {LM_PREFIX + k[len("model.") :]: v.contiguous() for k, v in masks.items()}
        os.makedirs(os.path.join(out, os.path.dirname(MASKS_FILE)), exist_ok=True)
        save_file(renamed, os.path.join(out, MASKS_FILE))
    return out
