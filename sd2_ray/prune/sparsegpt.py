"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): mask selection plus OBS weight updates.

For a linear layer with weight W (rows = outputs, columns = inputs) and calibration inputs X,
the layer-wise objective is ||W X - W' X||^2, whose Hessian is H = 2 X^T X / n. Columns are
processed left to right in blocks: inside a block the mask is chosen by w^2 / [H^-1]_jj^2
(the OBS saliency), every pruned weight's error is spread onto the columns to its right
through the upper Cholesky factor of H^-1, and the block's accumulated error is pushed onto
the later blocks in one matrix product (the "lazy batch" update of GPTQ / SparseGPT).

Pure tensor functions; the activations come from hooks in :mod:`sd2_ray.prune.sequential`.
"""

from __future__ import annotations

import logging

import torch

from sd2_ray.errors import Sd2Error
from sd2_ray.prune.selection import lowest_k, prune_count

log = logging.getLogger(__name__)


class Hessian:
    """Running H = 2 X^T X / n over the calibration tokens fed to one linear layer."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.xtx.device, torch.float32)
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of H^-1 with U^T U = H^-1, dead-input mask).

    Computed in float64: H of real activations is badly conditioned, and the factor is reused
    for every column. Inputs that never fire (zero diagonal) get a unit diagonal so H stays
    invertible; their weights are zeroed by the caller. If the factorisation still fails the
    dampening is raised tenfold, a few times, before giving up.
    """
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0], device=h.device)
    damp = dampening * torch.mean(torch.diag(h))
    for attempt in range(4):
        damped = h.clone()
        damped[diag, diag] += damp
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, dead
        log.warning("sparsegpt: Hessian not positive definite, raising dampening x10 (try %d)", attempt + 1)
        damp = damp * 10
    raise Sd2Error(
        "sparsegpt: Hessian cannot be inverted even with 1000x dampening; "
        "use more calibration samples or a larger --dampening"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(pruned and updated weight, keep-mask, OBS loss estimate) for one linear layer.

    Unstructured: every column block prunes its share of the layer's ``sparsity`` (cumulative
    rounding, so the layer total is exact). N:M: in every group of M columns each row keeps the
    N weights with the highest saliency, chosen when the sweep reaches the group (after the
    updates from the columns to its left).
    """
    rows, cols = weight.shape
    w_all = weight.detach().to(torch.float32).clone()
    upper, dead = inverse_hessian_factor(hessian.to(w_all.device), dampening)
    upper = upper.to(torch.float32)
    w_all[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w_all.device)
    loss = torch.zeros((), dtype=torch.float64, device=w_all.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if nm is None:
            share = prune_count(rows * end, sparsity) - prune_count(rows * start, sparsity)
        else:
            share = 0
        block_err, block_loss = _prune_block(w_all, upper, pruned, start, end, share, nm)
        loss += block_loss
        # Lazy batch update: the whole block's error reaches the later columns at once.
        w_all[:, end:] -= block_err @ upper[start:end, end:]
    return w_all.to(weight.dtype), ~pruned, float(loss) / 2


def _prune_block(
    w_all: torch.Tensor,
    upper: torch.Tensor,
    pruned: torch.Tensor,
    start: int,
    end: int,
    share: int,
    nm: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep columns start..end of ``w_all`` in place; returns (error matrix, summed OBS loss)."""
    block = w_all[:, start:end].clone()
    u_block = upper[start:end, start:end]
    u_diag = torch.diag(u_block)
    block_pruned = pruned[:, start:end]  # a view: the selection lands in ``pruned``
    errors = torch.zeros_like(block)
    if nm is None:
        block_pruned |= lowest_k(block.pow(2) / u_diag.pow(2).reshape(1, -1), share)
    n, m = nm if nm is not None else (0, 0)
    for i in range(end - start):
        if nm is not None and i % m == 0:
            saliency = block[:, i : i + m].pow(2) / u_diag[i : i + m].pow(2).reshape(1, -1)
            drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
            block_pruned[:, i : i + m].scatter_(1, drop, True)
        column = block[:, i]
        kept = torch.where(block_pruned[:, i], torch.zeros_like(column), column)
        err = (column - kept) / u_diag[i]
        block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
        block[:, i] = kept  # exact zeros (the update leaves rounding noise there)
        errors[:, i] = err
    w_all[:, start:end] = block
    return errors, errors.pow(2).sum().to(torch.float64)
