"""A vision-language pair in ``sd2 eval`` (pure: no Ray): a LLaVA target with a MASSV drafter
(a LLaVA sharing its vision tower) or a text-only LM, decoded by
:class:`~sd2_ray.vision.prefill.VisionSpecEngine`. The eval core keeps its flow (prompts,
target-only baseline, batches, figures) and asks this module wherever a VLM differs.

Prompts: a row's ``image``/``images`` (:mod:`sd2_ray.vision.data`'s contract) are read with
:func:`~sd2_ray.vision.images.load_image`, relative paths against the prompts file's directory;
its prompt gets one ``<image>`` mark per image, each expanded to one position a patch. A
prompt's pixel values ride on its ids (:class:`ImagePrompt`), so every list of prompts the core
passes around (baseline and drafter runs alike) keeps its images.

Cost: per drafted token, the drafter's LM (its linear layers' nonzero weights, as for text
drafters; the target's likewise); per image, reported apart: the vision tower once (one pass
feeds both projectors when the drafter carries the target's tower; a drafter with its own tower
pays its own pass), and each side's projector.
"""

from __future__ import annotations

from typing import Any

from sd2_ray.models.macs import linear_macs
from sd2_ray.models.tokens import encode_rendered
from sd2_ray.rows import DUPLICATE_ID, render_prompt, repeated_ids, row_problem, skip_record
from sd2_ray.vision.data import expand_marks, image_refs, with_image_marks
from sd2_ray.vision.model import is_vlm_dir, vision_macs
from sd2_ray.vision.prefill import VisionSpecEngine, same_tower, text_lm


class ImagePrompt(list):
    """A prompt's token ids carrying its images' pixel values (one (3, H, W) tensor each)."""

    images: tuple = ()

    @classmethod
    def of(cls, ids: list[int], images) -> ImagePrompt:
        prompt = cls(ids)
        prompt.images = tuple(images)
        return prompt


def prompt_images(prompt) -> tuple:
    """The pixel values a prompt carries (none for a plain list of ids)."""
    return getattr(prompt, "images", ())


def is_vision_target(target) -> bool:
    """Whether ``target`` (a model dir, local or s3://, or a loaded model) is a LLaVA VLM."""
    if not isinstance(target, str):
        return getattr(getattr(target, "config", None), "model_type", None) == "llava"
    from sd2_ray import storage

    if storage.is_s3(target):
        from sd2_ray.models.io import model_metadata_dir

        return is_vlm_dir(model_metadata_dir(target))  # the config alone, not the weights
    return is_vlm_dir(target)


def _is_llava(model) -> bool:
    return getattr(model.config, "model_type", None) == "llava"


def load_target(path: str, dtype, device):
    """(LLaVA model, tokenizer) of a VLM dir."""
    from sd2_ray import storage
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.vision.model import load_vlm

    return load_vlm(storage.local_dir(path), dtype=dtype, device=device), load_tokenizer(path)


def load_drafter(path_or_model, dtype, device):
    """(drafter, tokenizer or None): a MASSV dir as a LLaVA model, any other dir as a causal LM, a
    loaded model as it is (moved to ``device``)."""
    from sd2_ray.models.io import load_model, load_tokenizer

    if not isinstance(path_or_model, str):
        return path_or_model.to(device), None
    if is_vision_target(path_or_model):
        return load_target(path_or_model, dtype, device)
    return load_model(path_or_model, dtype=dtype, device=device), load_tokenizer(path_or_model)


def images_dir(settings) -> str:
    """Where relative image paths are read from: the prompts file's directory (or the prompts
    directory itself), when the settings name one (``sd2 eval``'s config does); else the cwd."""
    from sd2_ray import storage

    prompts = getattr(settings, "prompts", None)
    if not prompts:
        return ""
    return prompts if storage.is_dir(prompts) else storage.parent(prompts)


def image_prompts(rows: list[dict[str, Any]], tokenizer, target, max_prompt_tokens: int | None, base_dir: str = ""):
    """(prompts as :class:`ImagePrompt`, the rows they came from, skipped rows with reasons), as
    :func:`sd2_ray.evaluate.core.usable_prompts` for text targets, plus: an image that cannot be
    read, or a prompt with more ``<image>`` marks than images, skips its row."""
    from sd2_ray.rows import instruction_messages
    from sd2_ray.vision.images import BadImage, image_processor, load_image, pixel_values

    processor = image_processor(target.config)
    image_token, patches = int(target.config.image_token_id), int(target.config.image_seq_length)
    prompts, kept, skipped = [], [], []
    repeated = repeated_ids(rows)
    for index, row in enumerate(rows):
        problem = row_problem(row) if isinstance(row, dict) else "row must be an object"
        problem = DUPLICATE_ID if index in repeated else problem
        ids: list[int] = []
        pixels: Any = ()
        if not problem:
            try:
                refs = image_refs(row)
                images = [load_image(ref, base_dir=base_dir) for ref in refs]
                marked = with_image_marks(instruction_messages(row), len(refs))
                text = render_prompt({"messages": marked}, tokenizer)
                ids = expand_marks(encode_rendered(text, tokenizer), image_token, patches)
                pixels = tuple(pixel_values(images, processor)) if images else ()
            except (BadImage, ValueError) as err:
                problem = str(err)
        if not problem and max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            problem = (
                f"prompt has {len(ids)} tokens (images included); with the generation it would pass "
                f"the context window (at most {max_prompt_tokens} prompt tokens)"
            )
        if problem:
            skipped.append(skip_record(index, row, problem))
        else:
            prompts.append(ImagePrompt.of(ids, pixels))
            kept.append(row)
    return prompts, kept, skipped


def target_only_engine(target, tokenizer, settings) -> VisionSpecEngine:
    return VisionSpecEngine(target, None, 0, target_tokenizer=tokenizer, compile=settings.compile)


def pair_engine(target, drafter_dir, k: int, t_tok, d_tok, dtype, where: str, settings):
    """(the pair's engine, the drafter's MACs report with ``per_image`` costs added)."""
    drafter, loaded_tok = load_drafter(drafter_dir, dtype, where)
    engine = VisionSpecEngine(
        target, drafter, k, target_tokenizer=t_tok, drafter_tokenizer=d_tok or loaded_tok, compile=settings.compile
    )
    return engine, {**lm_macs(drafter), "per_image": image_costs(target, drafter)}


def lm_macs(model) -> dict[str, Any]:
    """:func:`~sd2_ray.models.macs.linear_macs` of a model's language model (a LLaVA's LM half:
    its vision tower and projector run once per image, not per token)."""
    return linear_macs(text_lm(model) if _is_llava(model) else model)


def image_costs(target, drafter) -> dict[str, Any]:
    """MACs per image: the target's tower and projector, and what the drafter adds (its
    projector; its own tower pass unless it shares the target's)."""
    ours = vision_macs(target.config)
    massv = _is_llava(drafter)
    shared = massv and same_tower(target, drafter)
    theirs = vision_macs(drafter.config) if massv else {"vision_tower": 0, "projector": 0}
    return {
        "drafter_kind": "massv" if massv else "text",
        "shared_tower": shared,
        "vision_tower": ours["vision_tower"],
        "target_projector": ours["projector"],
        "drafter_vision_tower": 0 if shared else theirs["vision_tower"],
        "drafter_projector": theirs["projector"],
    }


def image_report(d_macs: dict[str, Any], prompts: list) -> dict[str, Any]:
    """The report's ``vision`` entry: images decoded and their MACs (per image and in all)."""
    costs = d_macs["per_image"]
    images = sum(len(prompt_images(p)) for p in prompts)
    drafter = costs["drafter_vision_tower"] + costs["drafter_projector"]
    per_image = costs["vision_tower"] + costs["target_projector"] + drafter
    return {
        "images": images,
        "image_prompts": sum(1 for p in prompts if prompt_images(p)),
        "drafter_kind": costs["drafter_kind"],
        "shared_tower": costs["shared_tower"],
        "vision_tower_macs_per_image": costs["vision_tower"],
        "target_projector_macs_per_image": costs["target_projector"],
        "drafter_vision_tower_macs_per_image": costs["drafter_vision_tower"],
        "drafter_projector_macs_per_image": costs["drafter_projector"],
        "drafter_macs_per_image": drafter,  # what drafting adds to the target-only image cost
        "macs_per_image": per_image,
        "image_macs": per_image * images,
    }


def warm_up_request(prompt):
    """A short untimed request for the engine's warm-up: the whole prompt when it has images
    (a cut one would lose image positions), else its first 16 ids."""
    from sd2_ray.specdec.types import GenerationRequest

    images = prompt_images(prompt)
    return GenerationRequest(list(prompt) if images else list(prompt[:16]), 4, images=images)
