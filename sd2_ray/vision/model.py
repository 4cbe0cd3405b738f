"""LLaVA-style models of the kit and MASSV: a CLIP vision tower, a projector, a Llama LM.

Both the kit's vision-language target and a MASSV drafter are ``LlavaForConditionalGeneration``
checkpoints (a class vLLM also serves): the drafter is the *target's* frozen vision tower, a
projector of its own (vision width → the drafter's width) and a small text LM. Their tokenizers
are the kit tokenizer plus one ``<image>`` token, which a prompt repeats once per image patch
(``image_seq_length``), so the target and every drafter see an image at the same positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sd2_ray.vision.scenes import IMAGE_PLACEHOLDER, IMAGE_SIZE


@dataclass(frozen=True)
class VisionShape:
    hidden: int = 128
    layers: int = 2
    heads: int = 2  # heads of 64, as everywhere in the kit
    intermediate: int = 512
    image_size: int = IMAGE_SIZE
    patch: int = 16  # one patch a grid cell

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


VISION = VisionShape()


def vision_tokenizer(tokenizer):
    """A copy of a text tokenizer with the ``<image>`` token added (a special token: never
    split, never merged with its neighbours)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        tok.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    return tok


def image_token_id(tokenizer) -> int:
    return int(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))


def with_vocab(text_model, vocab: int):
    """``text_model`` with its (tied) embedding grown to ``vocab`` rows, the new rows the mean of
    the old ones (an untrained token then reads as an average word, not as noise)."""
    old = text_model.get_input_embeddings().weight.shape[0]
    if old < vocab:
        text_model.resize_token_embeddings(vocab, mean_resizing=True)
    return text_model


def llava_config(text_config, vision: VisionShape, image_token: int):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision_config = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch,
        projection_dim=vision.hidden,
    )
    text = text_config.to_dict()
    text["tie_word_embeddings"] = True
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text,
        image_token_index=image_token,
        image_seq_length=vision.patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # the CLS token is dropped: one token a patch
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def build_vlm(text_model, tokenizer, vision: VisionShape = VISION, seed: int = 0):
    """A LLaVA model over ``text_model`` (its weights copied in, the embedding grown by the
    image token): a fresh vision tower and projector seeded by ``seed``."""
    from transformers import LlavaForConditionalGeneration

    text_model = with_vocab(text_model, len(tokenizer))
    config = llava_config(text_model.config, vision, image_token_id(tokenizer))
    torch.manual_seed(seed)
    # .float(), not .to(torch.float32): transformers' typing of .to rejects a dtype under mypy
    model = LlavaForConditionalGeneration(config).float()
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _copy_generation_ids(model, tokenizer)
    return model


def build_drafter(text_drafter, target_vlm, tokenizer, seed: int = 0):
    """A MASSV drafter: the target's vision tower (copied, frozen in training), a fresh
    projector to the drafter's width, and ``text_drafter`` as its LM."""
    from transformers import LlavaForConditionalGeneration

    text_drafter = with_vocab(text_drafter, len(tokenizer))
    vision = target_vlm.config.vision_config
    shape = VisionShape(
        vision.hidden_size,
        vision.num_hidden_layers,
        vision.num_attention_heads,
        vision.intermediate_size,
        vision.image_size,
        vision.patch_size,
    )
    config = llava_config(text_drafter.config, shape, target_vlm.config.image_token_id)
    torch.manual_seed(seed)
    # .float(), not .to(torch.float32): transformers' typing of .to rejects a dtype under mypy
    model = LlavaForConditionalGeneration(config).float()
    model.model.vision_tower.load_state_dict(target_vlm.model.vision_tower.state_dict())
    model.model.language_model.load_state_dict(text_drafter.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _copy_generation_ids(model, tokenizer)
    return model


def _copy_generation_ids(model, tokenizer) -> None:
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
        setattr(model.config.text_config, name, getattr(tokenizer, name))


def is_vlm_dir(path: str) -> bool:
    """Whether a local model directory holds a LLaVA-style checkpoint."""
    import json
    import os

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == "llava"


def load_vlm(path: str, dtype=torch.float32, device="cpu"):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()


def vision_macs(config) -> dict[str, int]:
    """MACs of one image: the vision tower's linears (all patches + CLS) and the projector's."""
    v, t = config.vision_config, config.text_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    patch_embed = (v.image_size // v.patch_size) ** 2 * 3 * v.patch_size * v.patch_size * v.hidden_size
    projector = (tokens - 1) * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
    return {"vision_tower": tokens * per_layer * v.num_hidden_layers + patch_embed, "projector": projector}


def shape_of(vision: VisionShape) -> dict:
    return asdict(vision)


def save_vlm(model, tokenizer, out: str) -> None:
    """A LLaVA checkpoint vLLM can serve as it is: weights, tokenizer (with the chat template) and
    the LLaVA processor (CLIP preprocessing, patch size, image token)."""
    from transformers import LlavaProcessor

    from sd2_ray.vision.images import image_processor

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor(model.config),
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
