"""A preallocated KV cache for speculative decoding: slot == position, rollback by length.

Every row owns ``capacity`` slots per layer, allocated once per batch. The token at logical
position p of row b is written in place into slot p of row b (a scatter), so rejecting drafts
is only ``lengths -= rejected``: the stale slots are hidden by the mask and overwritten by the
next tokens. Nothing is re-allocated, re-sliced or compacted per step (compare
:class:`~sd2_ray.specdec.kv.RaggedKV`, which keeps rejected slots as holes). One extra slot is
a trash slot that padding columns write into; it is never attended.

Chunks are right-aligned (padding on the left), as for ``RaggedKV``, so the logits a caller
needs are always in the last columns. The attention mask is one comparison per forward,
``slot <= query position``, shared by every layer and handed to the model as a 4D mask, so
Hugging Face builds none. A padding query attends to its row's history (slot 0 at least), so
no softmax row is empty: an empty one gives NaN, and 0 * NaN would leak into real rows.

Attention reads the first ``read_width`` slots. Eagerly that is a multiple of ``WIDTH_STEP``
covering every position written so far (a host-side upper bound, so sizing it never syncs);
for compiled steps it is fixed to the whole capacity, so shapes never change.
"""

from __future__ import annotations

import torch

WIDTH_STEP = 64
CAPACITY_STEP = 256  # capacities are rounded up so compiled steps see few distinct shapes
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}  # attention implementations taking a 4D mask


def supports_static(model) -> bool:
    """True when the model's attention takes a custom 4D mask (sdpa or eager attention)."""
    return getattr(model.config, "_attn_implementation", None) in MASK_KINDS


def round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def num_cache_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers


class StaticKV:
    """The :class:`~sd2_ray.specdec.kv.RaggedKV` interface over preallocated slots.

    ``capacity``: the most tokens a row will hold (prompt + generated + drafts in flight).
    ``fixed_width``: attention always reads the whole capacity (compiled steps); on CUDA the
    tensors the steps mutate in place are then marked as static addresses, which CUDA graphs
    need to replay over them.
    """

    def __init__(self, model, batch_size: int, capacity: int, fixed_width: bool = False):
        from sd2_ray.models.device import input_device

        self.model = model
        self.device = input_device(model)
        self.trash = capacity  # slots 0..capacity-1 hold tokens, slot ``capacity`` is trash
        self.fixed_width = fixed_width
        self.mask_kind = MASK_KINDS[model.config._attn_implementation]
        self.mask_dtype = model.dtype
        from sd2_ray.specdec.slot_cache import SlotCache  # transformers: imported only when used

        self.cache = SlotCache(self, num_cache_layers(model))
        self.lengths = self.pinned(torch.zeros(batch_size, dtype=torch.long, device=self.device))  # per row
        self.slot_ids = torch.arange(capacity + 1, device=self.device)
        self.write_slots = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.bound = 0  # host-side upper bound of max(lengths)
        self.read_width = capacity + 1 if fixed_width else 0

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.fixed_width and tensor.device.type == "cuda":
            import torch._dynamo

            torch._dynamo.mark_static_address(tensor)
        return tensor

    def reserve(self, width: int) -> None:
        """Account for a chunk of ``width`` columns before it is run (host only, no sync)."""
        self.bound += width
        if self.bound > self.trash:
            raise RuntimeError(f"static KV cache overflow: {self.bound} tokens in {self.trash} slots")
        if not self.fixed_width:
            self.read_width = min(self.trash + 1, -(-self.bound // WIDTH_STEP) * WIDTH_STEP)

    def inputs(self, real: torch.Tensor):
        """Position ids, write slots and the 4D mask of a right-aligned chunk (``real``: (B, W))."""
        positions = self.lengths.unsqueeze(1) + real.long().cumsum(1) - 1  # of the real tokens
        slots = torch.where(real, positions, self.trash)
        seen = torch.where(real, positions, (self.lengths - 1).clamp(min=0).unsqueeze(1))
        mask = self.slot_ids[: self.read_width].view(1, 1, 1, -1) <= seen.unsqueeze(1).unsqueeze(-1)
        if self.mask_kind == "additive":
            mask = torch.zeros((), dtype=self.mask_dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.mask_dtype).min
            )
        return positions.clamp(min=0), slots, mask

    def run(self, tokens: torch.Tensor, real: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """One forward of a chunk the caller has reserved; traceable (no host reads)."""
        return self.call(real, input_ids=tokens, logits_to_keep=logits_to_keep).logits

    def call(self, real: torch.Tensor, **inputs):
        """The model's whole output for a reserved chunk; ``inputs``: ``input_ids`` and any other
        keyword the model takes (a model that is not a token LM, e.g. a feature head, takes its
        own), the cache adds the mask, positions and itself."""
        positions, self.write_slots, mask = self.inputs(real)
        out = self.model(
            attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True, **inputs
        )
        self.lengths.add_(real.sum(1))
        return out

    def outputs(self, real: torch.Tensor, **inputs):
        """:meth:`call` for a chunk not reserved yet (eager callers): reserves, then runs."""
        real = real.to(self.device)
        self.reserve(real.shape[1])
        return self.call(real, **inputs)

    def forward(self, tokens: torch.Tensor, real: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Append a chunk (B, W) whose ``real`` slots are tokens and the rest padding; logits of the
        last ``logits_to_keep`` columns (all when 0), on ``self.device``."""
        tokens, real = tokens.to(self.device), real.to(self.device)
        self.reserve(tokens.shape[1])
        return self.run(tokens, real, logits_to_keep).to(self.device)

    def drop_last(self, counts: torch.Tensor) -> None:
        """Roll row i back by ``counts[i]`` tokens (rejected drafts): only the lengths change."""
        self.lengths.sub_(counts.to(self.device))
        self.resync()

    def resync(self) -> None:
        """Tighten the host bound to the real lengths (one sync; callers do it once per pass)."""
        self.bound = int(self.lengths.max()) if self.lengths.numel() else 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch)."""
        rows = rows.to(self.device)
        for layer in self.cache.slot_layers:
            if layer.keys is not None and layer.values is not None:  # initialized
                layer.keys = self.pinned(layer.keys.index_select(0, rows.to(layer.keys.device)))
                layer.values = self.pinned(layer.values.index_select(0, rows.to(layer.values.device)))
        self.lengths = self.pinned(self.lengths.index_select(0, rows))
        self.resync()
