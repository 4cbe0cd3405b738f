"""The optimizer DeepSpeed steps and its learning-rate schedule (pure torch).

AdamW over two parameter groups (decay on matrices, none on biases and norm weights), either
the client ``torch.optim.AdamW`` or DeepSpeed's own (then built from the DeepSpeed config,
:mod:`sd2_ray.finetune.deepspeed_config`), and the client schedule: linear warm-up, then
cosine to ``min_lr_ratio`` of the peak, or constant. The client schedule is the one saved in
every checkpoint, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The client schedule over ``optimizer`` (DeepSpeed calls this with the optimizer it built)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, schedule, floor))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def client_optimizer(groups: list[dict], optimizer: str, lr: float) -> torch.optim.Optimizer | None:
    """``torch_adamw``: the client AdamW over ``groups``; ``deepspeed_adamw``: None (DeepSpeed builds
    its own from the config's ``optimizer`` section)."""
    if optimizer != "torch_adamw":
        return None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
