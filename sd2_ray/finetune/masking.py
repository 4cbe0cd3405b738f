"""Keep pruned weights at exactly zero while DeepSpeed ZeRO trains the drafter.

Measured on this stack (stack-notes.md): masking the *gradients* keeps the zeros under
ZeRO-2 and ZeRO-3, provided the masked weights are zero from the start; masking only the
fp32 master weights after the step does not (the compute copy is refreshed late). So:

1. zero the masked weights once after loading (:func:`prepare_masks`);
2. register a gradient hook per masked parameter *before* ``deepspeed.initialize``
   (:func:`register_gradient_masks`): the hook sees the full, unpartitioned gradient, and
   zero gradient + zero weight stays zero through AdamW (moments stay 0, decoupled weight
   decay multiplies by 0);
3. verify with :func:`count_masked_nonzero`, which under ZeRO-3 reads each rank's own
   partition of the weights (never gathers the model) and sums the counts over the ranks.

Memory: the hooks keep their masks bit-packed on the gradient's device (:class:`PackedMask`,
1 bit per weight: 1/16 of a bf16 copy, 1/32 of an fp32 one) and unpack one parameter's mask at
a time, while its gradient is being masked.

Pure torch at import time; DeepSpeed is imported only inside the ZeRO-3 paths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import operator
from collections.abc import Mapping
from typing import Any

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


class PackedMask:
    """A keep-mask (``True`` = kept) stored 1 bit per weight in a flat uint8 tensor."""

    def __init__(self, bits: torch.Tensor, shape: tuple[int, ...]):
        self.bits = bits
        self.shape = tuple(shape)

    @classmethod
    def of(cls, mask: torch.Tensor, device: torch.device | str | None = None) -> PackedMask:
        flat = mask.detach().reshape(-1).to(device=device or mask.device, dtype=torch.bool)
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
        bits = flat[:, 0].clone()
        for i in range(1, 8):  # one column at a time: no wider temporary than the bool mask
            bits |= flat[:, i] << i
        return cls(bits, tuple(mask.shape))

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size()

    def to(self, device: torch.device | str) -> PackedMask:
        return PackedMask(self.bits.to(device), self.shape)

    def flat(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Bool keep-flags of the flattened weights ``start .. start + count``."""
        count = self.numel() - start if count is None else count
        first, last = start // 8, -(-(start + count) // 8)
        shifts = torch.arange(8, device=self.bits.device, dtype=torch.uint8)
        unpacked = ((self.bits[first:last].unsqueeze(-1) >> shifts) & 1).to(torch.bool).reshape(-1)
        return unpacked[start - 8 * first : start - 8 * first + count]

    def unpack(self) -> torch.Tensor:
        return self.flat().view(self.shape)

    def kept(self) -> int:
        return int(self.flat().sum().item())


def pack_masks(model: torch.nn.Module, masks: Mapping[str, torch.Tensor | PackedMask]) -> dict[str, PackedMask]:
    """Each mask bit-packed on its parameter's device."""
    params = dict(model.named_parameters())
    return {k: m if isinstance(m, PackedMask) else PackedMask.of(m, params[k].device) for k, m in masks.items()}


def register_gradient_masks(model: torch.nn.Module, masks: Mapping[str, torch.Tensor | PackedMask]) -> list:
    """Multiply each masked parameter's gradient by its mask; returns the hook handles.

    Call before ``deepspeed.initialize`` (ZeRO-3 partitions the parameters in there, but the
    autograd hooks on the Parameter objects stay and still see full-shape gradients). Masks
    are bit-packed on the parameter's device (placed before this call), so no host->device
    copy happens per micro-step and the masks cost 1 bit per weight."""
    params = dict(model.named_parameters())
    return [params[key].register_hook(_Masker(packed)) for key, packed in pack_masks(model, masks).items()]


class _Masker:
    """Gradient hook multiplying by a bit-packed mask kept on the gradient's device."""

    def __init__(self, keep: PackedMask):
        self.keep = keep
        self.conversions = 0  # tests check that it stays 0 once the devices agree

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.keep.device != grad.device:
            self.keep = self.keep.to(grad.device)
            self.conversions += 1
        return grad * self.keep.unpack()  # bool x grad keeps the gradient's dtype


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Context in which ZeRO-3 partitioned parameters hold their full data (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _stray(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return ((weight != 0) & ~keep.to(weight.device)).sum()


def _partition_stray(param: torch.nn.Parameter, mask: torch.Tensor | PackedMask) -> torch.Tensor:
    """Nonzero masked weights in this rank's ZeRO-3 partition of ``param`` (its flattened
    weights ``rank * size .. (rank + 1) * size``, the last one padded)."""
    import torch.distributed as dist

    zero: Any = param  # ZeRO-3 sets ds_tensor, ds_process_group and ds_numel on the Parameter
    local = zero.ds_tensor.detach().view(-1)
    start = local.numel() * dist.get_rank(group=zero.ds_process_group)
    count = max(0, min(local.numel(), zero.ds_numel - start))
    packed = mask if isinstance(mask, PackedMask) else PackedMask.of(mask, local.device)
    return _stray(local[:count], packed.flat(start, count))


def count_masked_nonzero(model: torch.nn.Module, masks: Mapping[str, torch.Tensor | PackedMask]) -> int:
    """Masked weights that are not zero (0 = the sparsity held). Under ZeRO-3 each rank counts
    its own partitions and the counts are summed (every rank must call this together: the sum
    is a collective); no parameter is gathered."""
    if not masks:
        return 0
    named = dict(model.named_parameters())
    partitioned = [k for k in masks if getattr(named[k], "ds_tensor", None) is not None]
    whole = [k for k in masks if k not in partitioned]
    total = 0
    for key in whole:  # every rank holds these whole: counted here alone
        mask = masks[key]
        keep = mask.unpack() if isinstance(mask, PackedMask) else mask
        total += int(_stray(named[key].detach(), keep).item())
    if partitioned:
        import torch.distributed as dist

        local = functools.reduce(operator.add, (_partition_stray(named[k], masks[k]) for k in partitioned))
        if dist.is_initialized():
            # partitions offloaded to the CPU still sum over NCCL, which takes CUDA tensors only
            nccl = "nccl" in str(dist.get_backend())
            local = local.to(torch.device("cuda", torch.cuda.current_device()) if nccl else local.device)
            dist.all_reduce(local)
        total += int(local.item())
    return total


def mask_summary(masks: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """Counts for metrics: masked tensors, masked weights, and their share of the masked tensors."""
    total = sum(m.numel() for m in masks.values())
    zeros = total - sum(m.kept() if isinstance(m, PackedMask) else int(m.sum().item()) for m in masks.values())
    return {"masked_tensors": len(masks), "masked_weights": zeros, "masked_fraction": zeros / total if total else 0.0}
