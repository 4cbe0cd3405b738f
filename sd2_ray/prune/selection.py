"""Turning importance scores into keep-masks (``True`` = kept), unstructured or N:M.

Shared by SparseGPT, Wanda and magnitude: each method only decides what the score of a
weight is. Counts are exact (``topk``, not a threshold), so ties never change the sparsity.
"""

from __future__ import annotations

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a layer at ``sparsity`` zeroes (rounded to nearest)."""
    return int(round(numel * sparsity))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor shaped like ``scores``: ``True`` at the ``k`` smallest entries (the pruned ones)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        pruned[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return pruned.reshape(scores.shape)


def keep_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask that prunes the lowest-scoring fraction, over the whole matrix or in every row."""
    if not per_row:
        return ~lowest_k(scores, prune_count(scores.numel(), sparsity))
    k = prune_count(scores.shape[1], sparsity)
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        pruned.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return ~pruned


def keep_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def check_shape_for_nm(name: str, weight: torch.Tensor, nm: tuple[int, int] | None) -> None:
    from sd2_ray.errors import ConfigError

    if nm is not None and weight.shape[1] % nm[1]:
        raise ConfigError(f"pattern: layer '{name}' has {weight.shape[1]} inputs, not a multiple of M={nm[1]}")
