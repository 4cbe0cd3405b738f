"""Random tiny models for unit tests: built in milliseconds, no download, deterministic.

Architectures differ on purpose (Llama, Qwen2, GPT-NeoX) so engine code is tested on more
than one family. These are *untrained*: use the model kit (``sd2 kit``) where acceptance
numbers must mean something.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_VOCAB = 96


def tiny_config(
    arch: str = "llama",
    vocab_size: int = TINY_VOCAB,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 256,
):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=kv_heads, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=kv_heads, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    raise ValueError(f"unknown tiny architecture '{arch}'")


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs), dtype=torch.float32)
    return model.eval()
