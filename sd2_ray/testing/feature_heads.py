"""Training a feature head for tests and benches: a few optimizer steps on token sequences (the
target's own greedy continuations, typically), so that drafting from features has something to
show (MAL above 1) without a training stage."""

from __future__ import annotations

import torch


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (training batches)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def train_head(head, target, seqs: list[list[int]], steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` full-batch AdamW steps of the head's loss (token weight 1); the losses."""
    from sd2_ray.feature.losses import feature_head_loss

    ids, mask = padded(seqs)
    opt = torch.optim.AdamW(head.trainable_parameters(), lr=lr)
    head.train()
    losses = []
    for _ in range(steps):
        parts = feature_head_loss(head, target, ids, mask, token_weight=1.0)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        losses.append(parts.total.item())
    return losses
