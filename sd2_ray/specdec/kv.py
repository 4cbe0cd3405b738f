"""A KV cache for a batch whose rows hold different numbers of real tokens.

Speculative decoding makes rows diverge: each verification accepts a different number of draft
tokens per row. Instead of recomputing anything, rejected tokens become *holes*: cache slots
masked out by the 2D attention mask. Positions are logical (the count of real tokens before a
token), passed as ``position_ids``, so rotary/absolute embeddings are the ones the sequence
would have without holes. Attention is invariant to the physical order of cached keys (each
key carries its own position), and new tokens always come after every cached slot, so holes
anywhere are correct. Holes are trimmed when a column is empty in every row and compacted
away (a stable per-row gather) when they grow beyond a fraction of the cache.

Device: the bookkeeping tensors live where the model takes its inputs (``self.device``); chunks
are moved there and logits are returned there (a model sharded with a ``device_map`` may put
its last layers, hence its logits and some cache layers, on other GPUs).
"""

from __future__ import annotations

from typing import Any

import torch

HOLE_FRACTION_TO_COMPACT = 0.25


def right_aligned(seqs: list[list[int]], device=None, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as one (B, W) chunk, holes on the left (W: the longest
    list, or ``width``): the chunk layout :meth:`RaggedKV.forward` and the static cache take, so
    it lives with the caches that both drafters (same- and cross-vocabulary) feed."""
    width = max(len(s) for s in seqs) if width is None else width
    tokens = torch.tensor([[0] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    real = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in seqs], dtype=torch.bool, device=device)
    return tokens, real


class RaggedKV:
    def __init__(self, model, batch_size: int):
        from transformers import DynamicCache

        from sd2_ray.models.device import input_device

        self.model = model
        self.device = input_device(model)
        self.cache = DynamicCache(config=model.config)
        # (B, L): slot holds a real token
        self.real = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # real tokens per row

    def forward(self, tokens: torch.Tensor, real: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Append a chunk (B, W) whose ``real`` slots are tokens and the rest holes; return logits
        of the last ``logits_to_keep`` columns (all when 0), on ``self.device``."""
        return self.outputs(real, input_ids=tokens.to(self.device), logits_to_keep=logits_to_keep).logits.to(
            self.device
        )

    def outputs(self, real: torch.Tensor, **inputs):
        """The model's whole output for a chunk; ``inputs``: ``input_ids`` and any other keyword
        the model takes (``output_hidden_states``, ...), the cache adds the mask and positions."""
        real = real.to(self.device)
        mask = torch.cat([self.real, real], dim=1)
        if bool(mask.all()):
            # no holes anywhere: slot index == position, and HF's mask-free causal path is faster
            attention_mask = positions = None
        else:
            attention_mask = mask.long()
            positions = self.lengths.unsqueeze(1) + (real.long().cumsum(1) - 1).clamp_(min=0)
        out = self.model(
            attention_mask=attention_mask, position_ids=positions, past_key_values=self.cache, use_cache=True, **inputs
        )
        self.real = mask
        self.lengths = self.lengths + real.sum(1)
        return out

    run = forward  # the name the step functions call (see :mod:`sd2_ray.specdec.steps`)

    def drop_last(self, counts: torch.Tensor) -> None:
        """Turn the last ``counts[i]`` real tokens of row i into holes (rejected drafts)."""
        counts = counts.to(self.device)
        if not bool((counts > 0).any()):
            return
        real_from_end = self.real.flip(1).long().cumsum(1).flip(1)  # real slots at or after each slot
        self.real = self.real & ~(real_from_end <= counts.unsqueeze(1))
        self.lengths = self.lengths - counts
        self._tidy()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch)."""
        rows = rows.to(self.device)
        for layer in self._all_layers():  # each layer's keys may sit on its own GPU (device_map)
            keys = getattr(layer, "keys", None)
            layer.batch_select_indices(rows.to(keys.device) if keys is not None else rows)
        self.real, self.lengths = self.real[rows], self.lengths[rows]
        self._tidy()

    def _tidy(self) -> None:
        used = self.real.any(0)
        width = used.numel()
        if width == 0:
            return
        if not bool(used.any()):
            self._slice(0, 0)
            return
        idx = used.nonzero().squeeze(1)
        first, last = int(idx[0]), int(idx[-1]) + 1
        if first > 0 or last < width:
            self._slice(first, last)
        holes = self.real.numel() - int(self.lengths.sum())
        if holes > HOLE_FRACTION_TO_COMPACT * self.real.numel():
            self._compact()

    def _all_layers(self) -> list[Any]:
        """The cache's layers, duck-typed: their classes differ by model (full or sliding-window
        attention, ...)."""
        return self.cache.layers

    def _layers(self) -> list[Any]:
        return [
            layer for layer in self._all_layers() if getattr(layer, "keys", None) is not None and layer.keys.numel()
        ]

    def _slice(self, start: int, stop: int) -> None:
        for layer in self._layers():
            layer.keys = layer.keys[..., start:stop, :]
            layer.values = layer.values[..., start:stop, :]
        self.real = self.real[:, start:stop]

    def _compact(self) -> None:
        """Move each row's real slots to the right end (order kept), holes to the left, then trim."""
        order = torch.sort(self.real.long(), dim=1, stable=True).indices  # holes first, order kept
        for layer in self._layers():
            b, h, _, d = layer.keys.shape
            index = order.to(layer.keys.device).view(b, 1, -1, 1).expand(b, h, -1, d)
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        self.real = self.real.gather(1, order)
        keep_from = self.real.shape[1] - int(self.lengths.max()) if self.lengths.numel() else 0
        self._slice(keep_from, self.real.shape[1])

    @property
    def width(self) -> int:
        return self.real.shape[1]
