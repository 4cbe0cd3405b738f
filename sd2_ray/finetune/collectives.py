"""What the ranks of a fine-tune compute together, and on which device (pure torch.distributed).

Devices: everything a step creates (batches, the counts it all-reduces, masks it compares) is
made on the engine's device. Under NCCL a collective on a CPU tensor fails ("No backend type
associated with device type cpu"), and a CPU batch fed to a CUDA model fails in the embedding.
Outside a process group (one rank, a test) the collectives return their input.
"""

from __future__ import annotations

import torch


def engine_device(engine) -> torch.device:
    """Where the engine's model computes (``engine.device`` for DeepSpeed engines)."""
    device = getattr(engine, "device", None)
    if device is not None:
        return torch.device(device)
    return next(engine.parameters()).device


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks, on ``device`` (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank0_decides(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast on ``device``), so ranks whose own view
    differs (e.g. their clocks) still take the same branch; ``flag`` itself outside a group."""
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            agreed = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
            dist.broadcast(agreed, src=0)
            return bool(agreed.item())
    return flag
