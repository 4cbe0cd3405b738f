"""Images in requests to a vision-language (LLaVA) target, and loading such a target with its
drafter. No Ray, no HTTP: every problem is an :class:`OpenAIError` (a 400 naming the part).

A chat request's ``image_url`` parts become ``<image>`` marks in its rendered prompt; each mark,
one token after tokenisation, is expanded to the target's ``image_seq_length`` positions (one a
patch), and the images become pixel values (the target's CLIP preprocessing) carried by the
engine request. The URL must be inline (``data:image/<type>;base64,...``): the path and
``s3://`` forms :func:`sd2_ray.vision.images.load_image` also reads are the server's own files,
never a client's to name, and ``http(s)`` is fetched only where the config allows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sd2_ray.serve.openai_schema import OpenAIError
from sd2_ray.vision.images import DEFAULT_MAX_BYTES, BadImage, ImageTooLarge

DATA_PREFIX = "data:"
REMOTE_PREFIXES = ("http://", "https://")


@dataclass(frozen=True)
class ImagePolicy:
    """What a vision target takes: its preprocessing, image token and patches, and the limits."""

    processor: Any  # the target's CLIP image processor (PIL backend)
    image_token: int
    patches: int  # positions one image takes in the prompt
    mark: str  # the image token's text ("<image>"), what an image part renders as
    max_bytes: int = DEFAULT_MAX_BYTES
    max_images: int = 4
    allow_remote: bool = False


def image_policy(engine, tokenizer, config) -> ImagePolicy | None:
    """The policy of a vision engine (one with a ``target_vlm``); None for a text-only target."""
    vlm = getattr(engine, "target_vlm", None)
    if vlm is None:
        return None
    from sd2_ray.vision.images import image_processor

    token = int(vlm.config.image_token_id)
    return ImagePolicy(
        processor=image_processor(vlm.config),
        image_token=token,
        patches=int(vlm.config.image_seq_length),
        mark=str(tokenizer.convert_ids_to_tokens(token)),
        max_bytes=config.max_image_bytes,
        max_images=config.max_images_per_request,
        allow_remote=config.allow_remote_images,
    )


def check_image_parts(parts: Sequence[tuple[str, str]], policy: ImagePolicy | None) -> None:
    """The cheap checks, before anything is decoded: a vision target, and not too many images."""
    if not parts:
        return
    if policy is None:
        raise OpenAIError(
            "this model is text-only: image_url content parts need a vision-language target",
            param=parts[0][0],
            code="images_not_supported",
        )
    if len(parts) > policy.max_images:
        raise OpenAIError(
            f"{len(parts)} images in one request; this server takes at most {policy.max_images}",
            param="messages",
            code="too_many_images",
        )


def expand_image_tokens(
    prompt_ids: list[int], images: int, policy: ImagePolicy | None, param: str = "messages"
) -> list[int]:
    """The prompt with each image token repeated once per patch, after checking the prompt holds
    exactly one image token per image (a client's literal ``<image>`` in its text would otherwise
    take an image's place, or a position without one)."""
    if policy is None:
        return prompt_ids
    from sd2_ray.vision.data import expand_marks

    found = sum(1 for t in prompt_ids if t == policy.image_token)
    if found != images:
        raise OpenAIError(
            f"the prompt holds {found} image token(s) for {images} image(s): text must not contain "
            f"'{policy.mark}' (send images as image_url content parts of a chat request)",
            param=param,
            code="invalid_value",
        )
    return expand_marks(prompt_ids, policy.image_token, policy.patches)


def pixel_values(parts: Sequence[tuple[str, str]], policy: ImagePolicy) -> tuple:
    """(3, H, W) pixel values, one per image part, in order."""
    if not parts:
        return ()
    from sd2_ray.vision.images import pixel_values as preprocess

    pixels = preprocess([read_image(url, param, policy) for param, url in parts], policy.processor)
    return tuple(pixels[i] for i in range(len(parts)))


def read_image(url: str, param: str, policy: ImagePolicy):
    """The RGB image an ``image_url`` names, or the 400 that says what is wrong with it."""
    from sd2_ray.vision.images import load_image

    if url.startswith(REMOTE_PREFIXES):
        if not policy.allow_remote:
            raise OpenAIError(
                "remote image URLs are not allowed on this server: send the image inline as "
                "data:image/<type>;base64,<data> (or start the server with allow_remote_images)",
                param=param,
                code="remote_image_not_allowed",
            )
    elif not url.startswith(DATA_PREFIX):
        raise OpenAIError(
            "image_url.url must be a data:image/<type>;base64,<data> URL", param=param, code="invalid_image_url"
        )
    try:
        return load_image(url, max_bytes=policy.max_bytes, allow_remote=policy.allow_remote)
    except ImageTooLarge as err:
        raise OpenAIError(_message(err), param=param, code="image_too_large") from None
    except BadImage as err:
        raise OpenAIError(_message(err), param=param, code="invalid_image") from None


def _message(err: BadImage) -> str:
    return str(err).removeprefix("image: ")


# ---- loading ---------------------------------------------------------------------------------


def is_vision_target(path: str) -> bool:
    """Whether a model dir (local or s3://) holds a LLaVA-style checkpoint; reads only its config."""
    from sd2_ray.models.io import model_metadata_dir
    from sd2_ray.vision.model import is_vlm_dir

    return is_vlm_dir(model_metadata_dir(path))


def load_vision_engine(config, device, dtype):
    """(engine, target LM, target tokenizer) for a LLaVA target: a :class:`VisionSpecEngine`
    whose drafter is a MASSV LLaVA checkpoint, a text-only LM, or none. The target returned is
    the LLaVA model's language model (its config has the context and vocabulary the server
    bounds requests by; a LLaVA config keeps them in ``text_config``)."""
    from sd2_ray.errors import ConfigError
    from sd2_ray.models.io import load_model, load_tokenizer, resolve_model_dir
    from sd2_ray.vision.model import load_vlm
    from sd2_ray.vision.prefill import VisionSpecEngine

    if config.device_map is not None:
        raise ConfigError("field 'device_map': a vision-language target loads on one device (leave it unset)")
    target = load_vlm(resolve_model_dir(config.target), dtype=dtype, device=device)
    drafter = None
    if config.drafter:
        if is_vision_target(config.drafter):
            drafter = load_vlm(resolve_model_dir(config.drafter), dtype=dtype, device=device)
        else:
            drafter = load_model(config.drafter, dtype=dtype, device=device)
    engine = VisionSpecEngine(
        target,
        drafter,
        config.num_speculative_tokens,
        target_tokenizer=load_tokenizer(config.target),
        drafter_tokenizer=load_tokenizer(config.drafter) if config.drafter else None,
        compile=config.compile,
    )
    return engine, engine.target, engine.target_tokenizer
