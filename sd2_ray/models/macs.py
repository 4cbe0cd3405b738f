"""Per-token MAC accounting for decoder-only LMs (the cost side of the speedup formula).

Every linear layer (``nn.Linear`` and transformers' ``Conv1D``) costs one multiply-accumulate
per *nonzero* weight per token: a sparse drafter is charged only for the weights it keeps.
The LM head is included (it is a linear layer, counted once even if tied to the embedding);
embedding lookups cost no MACs. Attention scores (QK^T and AV) grow with the context, so they
are reported apart as MACs per context token. Cost coefficient c = drafter MACs / target MACs.
"""

from __future__ import annotations

from typing import Any

import torch


def _linear_weights(model: torch.nn.Module):
    """(name, weight as (out, in)) of every linear layer, each module once."""
    conv1d: type | None
    try:
        from transformers.pytorch_utils import Conv1D

        conv1d = Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        conv1d = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module.weight
        elif conv1d is not None and isinstance(module, conv1d):
            yield name, module.weight.t()  # Conv1D stores (in, out)


def _head_name(model: torch.nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)  # a transformers model's
    head = get_head() if get_head is not None else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def attention_macs_per_context_token(model: torch.nn.Module) -> int:
    """MACs of QK^T plus AV for one new token per token of context, summed over layers."""
    config: Any = model.config  # a transformers PretrainedConfig
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * heads * head_dim


def linear_macs(model: torch.nn.Module) -> dict[str, Any]:
    """Per-token MACs of a model's linear layers, dense and counting only nonzero weights.

    Returns ``macs`` (= sparse: nonzero weights, what a sparse kernel pays), ``dense_macs``,
    ``blocks_macs``/``blocks_dense_macs`` (everything but the LM head), ``head_macs``,
    ``sparsity`` of the linear layers, ``attention_macs_per_context_token`` and ``layers``
    ({name: {"in", "out", "dense", "nonzero"}}).
    """
    head = _head_name(model)
    layers: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for name, weight in _linear_weights(model):
            out_f, in_f = weight.shape
            layers[name] = {
                "in": int(in_f),
                "out": int(out_f),
                "dense": int(in_f * out_f),
                "nonzero": int(torch.count_nonzero(weight)),
            }
    dense = sum(v["dense"] for v in layers.values())
    sparse = sum(v["nonzero"] for v in layers.values())
    no_head = {"dense": 0, "nonzero": 0}
    head_info = layers.get(head, no_head) if head is not None else no_head
    return {
        "macs": sparse,
        "dense_macs": dense,
        "blocks_macs": sparse - head_info["nonzero"],
        "blocks_dense_macs": dense - head_info["dense"],
        "head_macs": head_info["nonzero"],
        "sparsity": 1.0 - sparse / dense if dense else 0.0,
        "attention_macs_per_context_token": attention_macs_per_context_token(model),
        "layers": layers,
    }


def macs_at_context(report: dict[str, Any], context: int) -> int:
    """Total MACs for one token generated after ``context`` tokens (linear + attention scores)."""
    return report["macs"] + report["attention_macs_per_context_token"] * context


def cost_coefficient(drafter: torch.nn.Module | dict, target: torch.nn.Module | dict) -> float:
    """c = drafter MACs per token / target MACs per token (nonzero weights, linear layers).

    Accepts models or :func:`linear_macs` reports."""
    d = drafter if isinstance(drafter, dict) else linear_macs(drafter)
    t = target if isinstance(target, dict) else linear_macs(target)
    return d["macs"] / t["macs"]


def predicted_speedup(mean_accepted_length: float, num_speculative_tokens: int, cost: float) -> float:
    """SD² Figure 1's improvement factor MAL / (K·c + 1)."""
    return mean_accepted_length / (num_speculative_tokens * cost + 1.0)
