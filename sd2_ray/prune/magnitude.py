"""Magnitude pruning: drop the smallest |w| (layer-wide for unstructured, per group for N:M)."""

from __future__ import annotations

import torch

from sd2_ray.prune.selection import keep_nm, keep_unstructured


def magnitude_prune(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep-mask). Needs no calibration data."""
    scores = weight.detach().abs().float()
    keep = keep_nm(scores, *nm) if nm else keep_unstructured(scores, sparsity, per_row=False)
    return weight.detach() * keep.to(weight.dtype), keep
