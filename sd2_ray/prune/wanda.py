"""Wanda (Sun et al., arXiv 2306.11695): score |W_ij| * ||X_j||_2, compared within each output row.

No weight update: the mask alone. The input norms come from calibration activations
(:class:`InputNorms`, fed by the hooks in :mod:`sd2_ray.prune.sequential`).
"""

from __future__ import annotations

import torch

from sd2_ray.prune.selection import keep_nm, keep_unstructured


class InputNorms:
    """Running sum of squared inputs per input feature of one linear layer."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sum_sq = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.sum_sq += (x * x).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sum_sq.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.to(weight.device, torch.float32).reshape(1, -1)


def wanda_prune(
    weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep-mask): per output row for unstructured, per group of M for N:M."""
    scores = wanda_scores(weight, input_norms)
    keep = keep_nm(scores, *nm) if nm else keep_unstructured(scores, sparsity, per_row=True)
    return weight.detach() * keep.to(weight.dtype), keep
