"""The Hugging Face cache classes behind :class:`~sd2_ray.specdec.static_kv.StaticKV` (apart,
so that importing the engine does not import transformers)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys/values: (B, kv_heads, capacity + 1, head_dim), written by position
    (``owner.write_slots``), read up to ``owner.read_width``; ``owner`` is the StaticKV."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # allocated on the layer's own device (a device_map may spread layers over GPUs)
        b, h = key_states.shape[:2]
        slots = self.owner.trash + 1
        self.keys = self.owner.pinned(
            torch.zeros((b, h, slots, key_states.shape[-1]), dtype=key_states.dtype, device=key_states.device)
        )
        self.values = self.owner.pinned(
            torch.zeros((b, h, slots, value_states.shape[-1]), dtype=value_states.dtype, device=value_states.device)
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # allocated by lazy_initialization
        b, h, q, _ = key_states.shape
        slots = self.owner.write_slots.to(key_states.device).view(b, 1, q, 1)
        keys.scatter_(2, slots.expand(b, h, q, keys.shape[-1]), key_states)
        values.scatter_(2, slots.expand(b, h, q, values.shape[-1]), value_states)
        width = self.owner.read_width
        return keys[:, :, :width], values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.read_width, 0

    def get_seq_length(self) -> int:
        return 0  # positions always come from the caller

    def get_max_length(self) -> int:
        return self.owner.trash


class SlotCache(Cache):
    """The model-facing cache: one :class:`SlotLayer` per decoder layer."""

    def __init__(self, owner, num_layers: int):
        super().__init__(layers=[SlotLayer(owner) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        """``layers`` as the SlotLayers they all are."""
        return [layer for layer in self.layers if isinstance(layer, SlotLayer)]
