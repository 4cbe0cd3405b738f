"""Image + text rows as training and decoding inputs: a prompt's ``<image>`` marks become one
image token per patch, the answer's tokens are the labels, and the images become pixel values.

Row contract (distill's input and output alike): ``messages`` whose user text holds one
``<image>`` mark per image (a row whose prompt has none gets one in front of its first user
turn), and ``image`` (one reference) or ``images`` (a list): data URLs, base64, local paths
relative to the prompts file, or ``s3://`` URIs (:mod:`sd2_ray.vision.images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sd2_ray.vision.scenes import IMAGE_PLACEHOLDER


def image_refs(row: dict[str, Any]) -> list[str]:
    """The row's image references, in prompt order (empty for a text row)."""
    images = row.get("images")
    if images is None:
        single = row.get("image")
        return [single] if single else []
    if hasattr(images, "tolist"):
        images = images.tolist()
    return [str(i) for i in images]


def is_image_row(row: dict[str, Any]) -> bool:
    return bool(image_refs(row))


def with_image_marks(messages: Sequence[dict], images: int) -> list[dict]:
    """The messages with one ``<image>`` mark per image: as given when they count right, else
    the missing marks put in front of the first user turn; too many marks is an error."""
    messages = [dict(m) for m in messages]
    marks = sum(str(m.get("content", "")).count(IMAGE_PLACEHOLDER) for m in messages)
    if marks > images:
        raise ValueError(f"messages have {marks} {IMAGE_PLACEHOLDER} marks for {images} image(s)")
    if marks < images:
        first = next(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[first]["content"] = IMAGE_PLACEHOLDER * (images - marks) + "\n" + str(messages[first]["content"])
    return messages


def expand_marks(ids: list[int], image_token: int, patches: int) -> list[int]:
    """Token ids with every image token repeated ``patches`` times (one position a patch)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * patches if t == image_token else [t])
    return out


def prompt_ids(tokenizer, messages: Sequence[dict], images: int, image_token: int, patches: int) -> list[int]:
    """The rendered prompt (generation prompt open) as ids, image marks expanded."""
    from sd2_ray.kit.tokenizer import render_chat

    text = render_chat(tokenizer, with_image_marks(messages, images))
    return expand_marks(tokenizer(text, add_special_tokens=False)["input_ids"], image_token, patches)


def encode(
    tokenizer, messages: Sequence[dict], response: str, images: int, image_token: int, patches: int, seq_len: int
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on the prompt) of one conversation, cut to ``seq_len``."""
    from sd2_ray.kit.tokenizer import render_chat

    marked = with_image_marks(messages, images)
    prompt = prompt_ids(tokenizer, marked, images, image_token, patches)
    full = expand_marks(
        tokenizer(render_chat(tokenizer, marked, response), add_special_tokens=False)["input_ids"], image_token, patches
    )
    labels = [-100] * len(prompt) + full[len(prompt) :]
    return {"input_ids": full[:seq_len], "labels": labels[:seq_len]}


def collate(examples: Sequence[dict], pad_id: int, pixels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels``, ``attention_mask`` and the batch's stacked
    ``pixel_values`` (the images of all examples, in order)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if len(pixels):
        batch["pixel_values"] = torch.stack(list(pixels))
    return batch
