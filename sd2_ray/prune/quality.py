"""How much a pruned model lost: held-out perplexity and one layer's reconstruction error."""

from __future__ import annotations

import math

import torch


def perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every predicted token of every sample (samples unpadded)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    return math.exp(nll / max(count, 1))


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 / ||X W^T||^2 for inputs ``X`` shaped ``[tokens, in]``."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    reference = x @ dense.double().t()
    return float((reference - x @ pruned.double().t()).pow(2).sum() / reference.pow(2).sum())
