"""Model sizes without loading a model: parameter counts and the dimensions memory estimates
need, from a Hugging Face ``config.json`` (read from the model dir, s3:// included, metadata
only) or, where that cannot be read (a planning machine without the bucket's credentials), from
the shapes of well-known models recognised by the directory's name."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# name fragment (lower case) -> config.json fields; public architecture facts of these models
KNOWN = {
    "llama-3.1-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates need of a decoder-only model."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    context: int
    source: str

    @property
    def block_params(self) -> int:
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.block_params + embeddings + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The biggest single module (ZeRO-3 gathers one at a time): the embedding or the head."""
        return max(self.vocab * self.hidden, 3 * self.hidden * self.intermediate)

    @property
    def prunable_params(self) -> int:
        """Weights of the decoder blocks' linear layers: what SD2 prunes and masks (the
        embeddings, the LM head and the norms stay dense)."""
        return self.layers * (self.block_params - 2 * self.hidden)

    @property
    def largest_prunable(self) -> int:
        return max(self.hidden * self.intermediate, self.hidden * self.heads * self.head_dim)

    def block_hessian_elements(self) -> int:
        """Hessian entries of one block's linear layers (SparseGPT keeps one per layer):
        q, k, v, gate, up read the hidden state, o the attention output, down the MLP's."""
        attention_out = self.heads * self.head_dim
        return 5 * self.hidden**2 + attention_out**2 + self.intermediate**2

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def shape_from_config(cfg: dict[str, Any], source: str) -> ModelShape:
    cfg = cfg.get("text_config", cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelShape(
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        context=int(cfg.get("max_position_embeddings") or 2048),
        source=source,
    )


def model_shape(path: str) -> ModelShape:
    """The shape of the model at ``path``: its config.json when it can be read, else a known
    model's by name; a one-line ConfigError when neither works."""
    from sd2_ray import storage
    from sd2_ray.errors import ConfigError

    try:
        return shape_from_config(json.loads(storage.read_text(storage.join(path, "config.json"))), path)
    except Exception as err:  # noqa: BLE001 - unreadable here (no credentials, no network): try the name
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for fragment, cfg in KNOWN.items():
        if fragment in name:
            log.info(
                "plan: %s: config.json not readable here (%s); using the known shape of %s", path, reason, fragment
            )
            return shape_from_config(cfg, f"known:{fragment}")
    raise ConfigError(
        f"{path}: cannot read config.json ({reason}) and the name matches no known model ({', '.join(KNOWN)})"
    )
