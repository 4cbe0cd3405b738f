"""The target's side of feature drafting: one forward pass that returns its logits, the features a
head reads (one or several entries of ``hidden_states``) and the feature its LM head reads (the
regression target). Always without gradients: the target is frozen."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TargetPass:
    logits: torch.Tensor  # (B, T, V)
    features: torch.Tensor  # (B, T, len(layers) * H): the head's input, layers concatenated
    top: torch.Tensor  # (B, T, H): hidden_states[-1], what the LM head reads (regression target)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left- and right-padded rows get the positions
    they would have alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def target_pass(target, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]) -> TargetPass:
    """Run the target once over (B, T) ids with (B, T) mask (1 = real; padding on either side)."""
    out = target(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=positions_of(attention_mask),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states
    return TargetPass(out.logits, layer_features(hidden, layers), hidden[-1])


def layer_features(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """The head's input from a forward's ``hidden_states``: the ``layers`` entries concatenated."""
    if len(layers) == 1:
        return hidden_states[layers[0]]
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


def target_features(
    target, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] = (-1,)
) -> torch.Tensor:
    """(B, T, len(layers) * H): the target's features at ``layers`` (indices into hidden_states)."""
    return target_pass(target, input_ids, attention_mask, layers).features
