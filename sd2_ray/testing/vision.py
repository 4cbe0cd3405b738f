"""Tiny untrained vision-language pairs for tests: a LLaVA target, a MASSV drafter sharing its
vision tower, and a text-only drafter, with one tokenizer (the kit's kind, trained in a second
on scene texts). Built in seconds; untrained, so only losslessness means something (and
:func:`varied_head` makes their outputs vary)."""

from __future__ import annotations

import os

from sd2_ray.vision.model import VisionShape

TINY_VISION = VisionShape(hidden=64, layers=1, heads=1, intermediate=128)


def scene_tokenizer(vocab_size: int = 400):
    from sd2_ray.kit.tokenizer import train_tokenizer
    from sd2_ray.vision import scenes
    from sd2_ray.vision.model import vision_tokenizer

    texts = [e["response"] + "\n" + e["messages"][0]["content"] for e in scenes.examples(200, 0, "train")]
    return vision_tokenizer(train_tokenizer(texts, vocab_size))


def tiny_text_lm(tokenizer, hidden: int, layers: int, seed: int):
    from sd2_ray.testing.tiny import tiny_model

    return tiny_model(
        "llama",
        seed=seed,
        vocab_size=len(tokenizer),
        hidden=hidden,
        layers=layers,
        heads=hidden // 64,
        kv_heads=hidden // 64,
        intermediate=2 * hidden,
        max_positions=512,
    )


def tiny_vision_dirs(out: str, seed: int = 0) -> dict[str, str]:
    """{"target", "drafter" (MASSV), "text_drafter"} model directories under ``out``."""
    from sd2_ray.vision.model import build_drafter, build_vlm, save_vlm

    tok = scene_tokenizer()
    target = build_vlm(tiny_text_lm(tok, 128, 2, seed), tok, TINY_VISION, seed=seed)
    drafter = build_drafter(tiny_text_lm(tok, 64, 2, seed + 1), target, tok, seed=seed + 2)
    text_drafter = tiny_text_lm(tok, 64, 2, seed + 1)
    dirs = {name: os.path.join(out, name) for name in ("target", "drafter", "text_drafter")}
    save_vlm(target, tok, dirs["target"])
    save_vlm(drafter, tok, dirs["drafter"])
    text_drafter.save_pretrained(dirs["text_drafter"])
    tok.save_pretrained(dirs["text_drafter"])
    return dirs


def varied_head(vlm, seed: int = 0, scale: float = 1.0):
    """``vlm`` (in place) with an untied random LM head. An untrained tied head maps a token's
    hidden state back onto that same token, so greedy decoding repeats one token whatever the
    image; a random head makes outputs depend on the context, images included, so a test that
    compares outputs can fail."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = vlm.lm_head.weight
    vlm.lm_head.weight = torch.nn.Parameter(torch.randn(weight.shape, generator=g, dtype=weight.dtype) * scale)
    vlm.config.tie_word_embeddings = False
    vlm.config.text_config.tie_word_embeddings = False
    return vlm


def scene_pixels(count: int, config, seed: int = 0, split: str = "eval") -> list:
    """Pixel values (3, H, W) of ``count`` held-out scenes for a LLaVA ``config``."""
    from sd2_ray.vision import scenes
    from sd2_ray.vision.images import image_processor, load_image, pixel_values

    processor = image_processor(config)
    return [pixel_values([load_image(e["image"])], processor)[0] for e in scenes.examples(count, seed, split)]
