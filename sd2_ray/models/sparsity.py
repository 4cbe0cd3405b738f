"""Sparsity masks: the contract between pruning, fine-tuning, eval and serving.

A sparse model directory holds its weights with zeros in place, ``masks/masks.safetensors``
(bool mask per pruned weight, ``True`` = kept) and ``sparsity.json``::

    {"method": "sparsegpt", "pattern": "unstructured" | "2:4", "target_sparsity": 0.5,
     "total_sparsity": 0.5, "layers": {"model.layers.0.self_attn.q_proj": {"sparsity": 0.5, ...}},
     "calibration": {...}}

Masks are derivable from zeros when the masks file is missing. It sits in a subdirectory because
the model dir is what vLLM serves: with no index file vLLM loads every top-level ``*.safetensors``
as weights, and the masks bear their weights' names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sd2_ray.errors import DataError

MASKS_FILE = "masks/masks.safetensors"  # relative to the model dir; never at its top (see above)
SPARSITY_FILE = "sparsity.json"


def mask_key(module_name: str) -> str:
    return f"{module_name}.weight"


def masks_from_zeros(model: torch.nn.Module, module_names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {mask_key(n): modules[n].weight.detach() != 0 for n in module_names}


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item()


def save_masks(out_dir: str, masks: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = os.path.join(out_dir, MASKS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.to(torch.bool).contiguous() for k, v in masks.items()}, path)
    with open(os.path.join(out_dir, SPARSITY_FILE), "w") as f:
        json.dump(report, f, indent=2)


def read_report(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, SPARSITY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_masks(model_dir: str, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Masks of a sparse model dir: from its masks file, else from the zeros of the
    layers named in ``sparsity.json``; empty for a dense model."""
    from safetensors.torch import load_file

    path = os.path.join(model_dir, MASKS_FILE)
    if os.path.isfile(path):
        return {k: v.to(torch.bool) for k, v in load_file(path).items()}
    report = read_report(model_dir)
    if not report or model is None:
        return {}
    return masks_from_zeros(model, list(report.get("layers", {})))


def check_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: str = "model") -> None:
    """Raise :class:`DataError` unless every mask names a weight of the right shape."""
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        if key not in params:
            raise DataError(f"{source}: mask '{key}' names no parameter of the model")
        if tuple(params[key].shape) != tuple(mask.shape):
            raise DataError(
                f"{source}: mask '{key}' has shape {tuple(mask.shape)}, weight has {tuple(params[key].shape)}"
            )


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, mask in masks.items():
            params[key].mul_(mask.to(device=params[key].device, dtype=params[key].dtype))


def masked_weights_nonzero(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """How many weights that the masks say must be zero are not (0 means the sparsity held)."""
    params = dict(model.named_parameters())
    # compared where the weight is (a CUDA weight against a CPU mask is a device mismatch)
    return int(sum(((params[k].detach() != 0) & ~m.to(params[k].device)).sum().item() for k, m in masks.items()))


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive input weights in a row has at most ``n`` nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    groups = (weight.detach() != 0).reshape(rows, cols // m, m).sum(-1)
    return bool((groups <= n).all())


def sparsity_problems(
    model: torch.nn.Module,
    masks: dict[str, torch.Tensor],
    report: dict[str, Any] | None = None,
    tolerance: float = 1e-6,
) -> list[str]:
    """Everything wrong with a sparse model against its masks and ``sparsity.json`` report:
    masks that name no weight, masked weights that are nonzero, N:M groups with too many
    nonzeros, per-layer sparsity that differs from the report. Empty when all holds."""
    problems: list[str] = []
    try:
        check_masks(model, masks)
    except DataError as err:
        return [str(err)]
    params = dict(model.named_parameters())
    pattern = (report or {}).get("pattern", "unstructured")
    nm = tuple(int(p) for p in pattern.split(":")) if ":" in str(pattern) else None
    layers = (report or {}).get("layers", {})
    for key, mask in masks.items():
        weight = params[key].detach()
        leaked = int(((weight != 0) & ~mask).sum())
        if leaked:
            problems.append(f"{key}: {leaked} weights are nonzero where the mask says pruned")
        if nm is not None and not check_nm(weight, *nm):
            problems.append(f"{key}: a group of {nm[1]} has more than {nm[0]} nonzeros")
        expected = layers.get(key[: -len(".weight")] if key.endswith(".weight") else key, {}).get("sparsity")
        if expected is not None and abs(sparsity_of(mask) - expected) > tolerance:
            problems.append(f"{key}: mask sparsity {sparsity_of(mask):.6f}, report says {expected:.6f}")
    return problems
