"""Layer-pruned baseline (Gromov et al., arXiv 2403.17887): drop the most redundant run of blocks.

For n consecutive blocks starting at l, the angular distance between the hidden state entering
block l and the one entering block l+n is d(l, n) = arccos(cos(h_l, h_{l+n})) / pi, averaged
over every calibration token. The run with the smallest d changes the residual stream least,
so it is dropped. h_l for l < L comes from ``output_hidden_states=True``; h_L is the raw output
of the last block, because HF's last hidden state already has the final norm applied.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from sd2_ray.errors import ConfigError, DataError
from sd2_ray.prune.sequential import block_output, decoder_blocks

log = logging.getLogger(__name__)


def residual_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """[h_0, ..., h_L] for one sample: inputs of every block, then the last block's output,
    each flattened to ``[tokens, hidden]`` in float32."""
    _, blocks = decoder_blocks(model)
    last: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(block_output(out)))
    try:
        with torch.no_grad():
            out = model(ids.to(next(model.parameters()).device), output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    states = list(out.hidden_states[: len(blocks)]) + last
    return [h.reshape(-1, h.shape[-1]).float() for h in states]


def token_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a_t, b_t)) / pi per token (row)."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def angular_distances(model: torch.nn.Module, batches: list[torch.Tensor], n: int) -> list[float]:
    """d(l, n) for every start l = 0 .. L-n, averaged over all calibration tokens."""
    _, blocks = decoder_blocks(model)
    layers = len(blocks)
    if not 1 <= n < layers:
        raise ConfigError(f"drop_layers: must be between 1 and {layers - 1} for a model with {layers} blocks, got {n}")
    sums = torch.zeros(layers - n + 1, dtype=torch.float64)
    tokens = 0
    for ids in batches:
        states = residual_states(model, ids)
        for start in range(layers - n + 1):
            sums[start] += token_angles(states[start], states[start + n]).sum().cpu()
        tokens += states[0].shape[0]
    return (sums / max(tokens, 1)).tolist()


def drop_blocks(model: torch.nn.Module, start: int, n: int) -> torch.nn.Module:
    """Remove blocks start..start+n-1 in place and make the config describe the smaller model."""
    _, blocks = decoder_blocks(model)
    layers = len(blocks)
    for _ in range(n):
        del blocks[start]  # ModuleList renumbers, so saved weight names stay contiguous
    for index, block in enumerate(blocks):
        for mod in block.modules():  # attention modules index the KV cache by their layer number
            attention: Any = mod  # a transformers module with an int layer_idx
            if isinstance(getattr(attention, "layer_idx", None), int):
                attention.layer_idx = index
    config: Any = model.config  # a transformers PretrainedConfig
    for key, value in list(vars(config).items()):
        # Per-layer lists (layer_types and the like) lose the dropped entries too.
        if isinstance(value, list) and len(value) == layers and "layer" in key:
            setattr(config, key, value[:start] + value[start + n :])
    config.num_hidden_layers = layers - n
    return model


def layer_prune(model: torch.nn.Module, batches: list[torch.Tensor], n: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Drop the ``n`` consecutive blocks with the smallest angular distance; (model, report)."""
    if not batches:
        raise DataError("calibration: layer pruning needs calibration samples")
    config: Any = model.config  # a transformers PretrainedConfig
    layers = config.num_hidden_layers
    distances = angular_distances(model, batches, n)
    start = min(range(len(distances)), key=lambda i: distances[i])  # ties: the earliest run
    log.info("layers: dropping blocks %d..%d (angular distance %.4f)", start, start + n - 1, distances[start])
    drop_blocks(model, start, n)
    report = {
        "method": "layers",
        "drop_layers": n,
        "dropped_blocks": list(range(start, start + n)),
        "start": start,
        "distance": distances[start],
        "distances": {str(i): d for i, d in enumerate(distances)},
        "num_hidden_layers_before": layers,
        "num_hidden_layers_after": layers - n,
        "calibration_tokens": int(sum(b.numel() for b in batches)),
    }
    return model, report


def matching_layer_drop(dense_dir: str, sparse_dir: str) -> int:
    """Blocks to drop from the dense drafter so its MACs come closest to the sparse drafter's
    (the layer baseline is compared with SD² at equal cost)."""
    from sd2_ray.models.io import load_model
    from sd2_ray.models.macs import linear_macs

    dense = linear_macs(load_model(dense_dir))
    sparse_macs = linear_macs(load_model(sparse_dir))["macs"]
    layers = _num_layers(dense_dir)
    per_block = dense["blocks_dense_macs"] / layers
    best = min(range(1, layers), key=lambda n: abs(dense["dense_macs"] - n * per_block - sparse_macs), default=1)
    log.info(
        "layer baseline: dropping %d of %d blocks (sparse drafter %d MACs, dense %d, per block %d)",
        best,
        layers,
        sparse_macs,
        dense["dense_macs"],
        per_block,
    )
    return best


def _num_layers(model_dir: str) -> int:
    from transformers import AutoConfig

    from sd2_ray.models.io import model_metadata_dir

    return int(AutoConfig.from_pretrained(model_metadata_dir(model_dir)).num_hidden_layers)  # no weights
