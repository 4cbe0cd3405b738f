"""Keep pruned weights at exactly zero while DeepSpeed ZeRO trains the drafter.

Measured on this stack (stack-notes.md): masking the *gradients* keeps the zeros under
ZeRO-2 and ZeRO-3, provided the masked weights are zero from the start; masking only the
fp32 master weights after the step does not (the compute copy is refreshed late). So:

1. zero the masked weights once after loading (:func:`prepare_masks`);
2. register a gradient hook per masked parameter *before* ``deepspeed.initialize``
   (:func:`register_gradient_masks`): the hook sees the full, unpartitioned gradient, and
   zero gradient + zero weight stays zero through AdamW (moments stay 0, decoupled weight
   decay multiplies by 0);
3. verify with :func:`count_masked_nonzero`, which gathers ZeRO-3 partitions first.

Pure torch at import time; DeepSpeed is imported only inside the ZeRO-3 gather.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from sd2_ray.errors import DataError
from sd2_ray.models.sparsity import apply_masks, check_masks, load_masks, masked_weights_nonzero

log = logging.getLogger(__name__)


def prepare_masks(model_dir: str, model: torch.nn.Module, source: str | None = None) -> dict[str, torch.Tensor]:
    """Load the model dir's masks, check they fit the model, and zero the masked weights.

    A dense model (no masks) gives ``{}``. A mask naming a missing parameter or of another
    shape is a :class:`DataError` naming the model dir.
    """
    source = source or model_dir
    try:
        masks = load_masks(model_dir, model)
    except DataError:
        raise
    except Exception as err:  # a truncated or foreign masks file
        raise DataError(f"{source}: cannot read masks ({type(err).__name__}: {err})") from None
    check_masks(model, masks, source=source)
    stray = masked_weights_nonzero(model, masks)
    if stray:
        log.warning("%s: %d masked weights were nonzero; zeroing them", source, stray)
    apply_masks(model, masks)
    return masks


def register_gradient_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Multiply each masked parameter's gradient by its mask; returns the hook handles.

    Call before ``deepspeed.initialize`` (ZeRO-3 partitions the parameters in there, but the
    autograd hooks on the Parameter objects stay and still see full-shape gradients)."""
    params = dict(model.named_parameters())
    handles = []
    for key, mask in masks.items():
        param = params[key]
        # 0/1 in the parameter's dtype on its device (placed before this call): one multiply per
        # gradient, no copy. Only a gradient of another dtype or device (bf16 under mixed
        # precision, a model moved afterwards) converts it, once, and keeps the converted copy.
        handles.append(param.register_hook(_Masker(mask.to(device=param.device, dtype=param.dtype))))
    return handles


class _Masker:
    """Gradient hook multiplying by a 0/1 mask kept on the gradient's device and in its dtype."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep
        self.conversions = 0  # tests check that it stays 0 once the devices agree

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.keep.device != grad.device or self.keep.dtype != grad.dtype:
            self.keep = self.keep.to(device=grad.device, dtype=grad.dtype)
            self.conversions += 1
        return grad * self.keep


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Context in which ZeRO-3 partitioned parameters hold their full data (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def count_masked_nonzero(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Masked weights that are not zero (0 = the sparsity held). Under ZeRO-3 every rank must
    call this together: the gather is a collective."""
    if not masks:
        return 0
    named = dict(model.named_parameters())
    params = [named[k] for k in masks]
    with _gathered(params):
        return masked_weights_nonzero(model, masks)


def mask_summary(masks: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """Counts for metrics: masked tensors, masked weights, and their share of the masked tensors."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum().item()) for m in masks.values())
    return {"masked_tensors": len(masks), "masked_weights": zeros,
            "masked_fraction": zeros / total if total else 0.0}
