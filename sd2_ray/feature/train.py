"""Training a feature head on streamed target features (pure torch: no Ray, no DeepSpeed).

A streamed row (:mod:`sd2_ray.feature.extract`) holds one sequence's target ids, its loss mask
(the response), the target's features at the head's layers, the feature its LM head reads
(``top``, only when that is not already the features) and the target's argmax at every position.
:func:`collate` right-pads rows into a batch; :class:`FeatureHeadLoss` is what DeepSpeed trains.

**Chain unrolling** (:func:`unroll`): step 0 is EAGLE's teacher-forced pass (the head reads the
target's feature at every position). Step t > 0 feeds the head its own predicted features of step
t - 1, one position on, as drafting a chain does: the chain that starts after position j reads
the target's features up to j, then its own predictions. All chains run in parallel in one
sequence of (t + 1) blocks with a mask: block t's column j sees block 0's columns <= j and its own
diagonal (blocks 1..t at column j), at position j + t. That is EAGLE-3's "training-time test";
``ttt_steps`` trains on those steps too, and the held-out check (:func:`chain_acceptance`) uses
the same unrolling to measure how many of K chained drafts the target would accept (greedy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sd2_ray.feature.head import FeatureHead, _causal_mask
from sd2_ray.feature.losses import feature_loss

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "features", "top", "target_ids")


def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Streamed rows -> right-padded tensors (``top`` is ``features`` when a row has none)."""
    width = max(len(r["input_ids"]) for r in rows)
    first = np.asarray(rows[0]["features"])
    has_top = rows[0].get("top") is not None
    hidden = np.asarray(rows[0]["top"]).shape[-1] if has_top else first.shape[-1]
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "loss_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "features": torch.zeros(len(rows), width, first.shape[-1]),
        "top": torch.zeros(len(rows), width, hidden),
        "target_ids": torch.zeros(len(rows), width, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        features = torch.tensor(np.asarray(row["features"]), dtype=torch.float32)  # Ray's arrays are read-only
        batch["input_ids"][i, :n] = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
        batch["loss_mask"][i, :n] = torch.as_tensor(np.asarray(row["loss_mask"]), dtype=torch.long)
        batch["features"][i, :n] = features
        batch["top"][i, :n] = torch.tensor(np.asarray(row["top"]), dtype=torch.float32) if has_top else features
        batch["target_ids"][i, :n] = torch.as_tensor(np.asarray(row["target_ids"]), dtype=torch.long)
    return batch


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, W', V) block t's logits at columns j = 0..W'-1 (W' = W - 1)
    regress: torch.Tensor  # (B, W', H) block t's predicted features (fed to block t + 1)


def unroll(head: FeatureHead, batch: dict[str, torch.Tensor], steps: int) -> list[StepOutput]:
    """Blocks 0..steps of the chain unrolling (module docstring); each recomputes the earlier
    blocks (one small layer: cheaper than a cache for the few steps a chain has)."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    width = ids.shape[1] - 1
    first = head.reduce_features(batch["features"][:, :width].to(_dtype(head)))
    key_real = real[:, :width] & real[:, 1:]
    inputs: list[torch.Tensor] = []
    outputs: list[StepOutput] = []
    features = first
    for t in range(steps + 1):
        next_ids = _shifted(ids, 1 + t, width)
        inputs.append(head.fuse(head.embed(next_ids).to(features.dtype), features))
        hidden = torch.cat(inputs, dim=1)
        positions = torch.cat([torch.arange(width, device=ids.device) + s for s in range(t + 1)])
        mask4d = _unrolled_mask(key_real, t + 1, hidden.dtype)
        logit_features, regress = head._layer(hidden, positions.unsqueeze(0).expand(len(ids), -1), mask4d)  # noqa: SLF001
        block = slice(t * width, (t + 1) * width)
        outputs.append(StepOutput(head.lm_logits(logit_features[:, block]), regress[:, block]))
        features = regress[:, block]
    return outputs


def step_mask(batch: dict[str, torch.Tensor], t: int, loss_only: bool = True) -> torch.Tensor:
    """(B, W') where block t's column j predicts a real position j + 1 + t (of the response)."""
    width = batch["input_ids"].shape[1] - 1
    keep = _shifted(batch["attention_mask"], 1 + t, width).bool()
    if loss_only:
        keep &= _shifted(batch["loss_mask"], 1 + t, width).bool()
    return keep


class FeatureHeadLoss(torch.nn.Module):
    """What DeepSpeed trains: the head (``.lm``: the fine-tune stage checkpoints and saves the
    module under that name, whatever it is) behind a forward returning its loss *summed* over the
    counted positions (the step divides by the global count, as for drafters). Step t of the
    unrolling weighs as much as step 0."""

    def __init__(self, head: FeatureHead, feature_weight: float = 1.0, token_weight: float = 0.1, ttt_steps: int = 0):
        super().__init__()
        self.lm = head
        self.feature_weight, self.token_weight, self.ttt_steps = feature_weight, token_weight, ttt_steps
        self.last: dict[str, float] = {}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=batch["features"].device)
        sums = dict.fromkeys(("feature", "token", "correct", "positions"), 0.0)
        for t, out in enumerate(unroll(self.lm, batch, self.ttt_steps)):
            mask = step_mask(batch, t)
            count = mask.sum()
            next_top = _shifted(batch["top"], 1 + t, mask.shape[1])
            next_ids = _shifted(batch["target_ids"], 1 + t, mask.shape[1])
            feature = feature_loss(out.regress, next_top, mask) * count
            log_q = torch.log_softmax(out.logits.float(), dim=-1)
            token = -(log_q.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) * mask).sum()
            total = total + self.feature_weight * feature + self.token_weight * token
            with torch.no_grad():
                sums["feature"] += float(feature)
                sums["token"] += float(token)
                sums["correct"] += float(((out.logits.argmax(-1) == next_ids) & mask).sum())
                sums["positions"] += float(count)
        self.last = sums
        return total


@torch.no_grad()
def chain_acceptance(head: FeatureHead, batch: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Greedy acceptance of K chained drafts from every response position (teacher-forced on the
    target's features up to the chain's start): ``accepted`` drafts summed over ``chains``, and
    per chain position. Expected MAL = 1 + accepted / chains (the target's own token included)."""
    outs = unroll(head, batch, k - 1)
    start_ok = step_mask(batch, 0)
    alive = start_ok.clone()
    accepted, per_position = 0.0, []
    for t, out in enumerate(outs):
        width = start_ok.shape[1]
        hit = out.logits.argmax(-1) == _shifted(batch["target_ids"], 1 + t, width)
        alive &= hit & step_mask(batch, t, loss_only=False)
        per_position.append(float(alive.sum()))
        accepted += per_position[-1]
    return {"accepted": accepted, "chains": float(start_ok.sum()), "per_position": per_position}


def _shifted(values: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """``values[:, offset : offset + width]``, zero-padded on the right past the end."""
    part = values[:, offset : offset + width]
    if part.shape[1] == width:
        return part
    pad = values.new_zeros((values.shape[0], width - part.shape[1], *values.shape[2:]))
    return torch.cat([part, pad], dim=1)


def _unrolled_mask(key_real: torch.Tensor, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, S) additive mask of ``blocks`` blocks of width W' (module docstring)."""
    width = key_real.shape[1]
    causal = _causal_mask(key_real, dtype)  # block 0: causal over real pairs
    if blocks == 1:
        return causal
    size = blocks * width
    allowed = torch.zeros(key_real.shape[0], size, size, dtype=torch.bool, device=key_real.device)
    allowed[:, :, :width] = (causal[:, 0, :, :] == 0).repeat(1, blocks, 1)
    diagonal = torch.eye(width, dtype=torch.bool, device=key_real.device)
    for q in range(1, blocks):
        for s in range(1, q + 1):
            allowed[:, q * width : (q + 1) * width, s * width : (s + 1) * width] = diagonal
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=key_real.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _dtype(head: FeatureHead) -> torch.dtype:
    return next(head.parameters()).dtype
