"""Training losses of a feature head (EAGLE's, as FSPAD trains them).

For a sequence x_0..x_{T-1} with target features f_0..f_{T-1}, the head's input at j is
(f_j, embedding of x_{j+1}); its outputs at j are compared with

* the target's feature f_{j+1}: Smooth L1, averaged over the hidden width, then over the
  real positions (EAGLE's ``vloss``);
* the target's next token at j+1 (the argmax of its logits there, which is x_{j+2} on
  self-distilled greedy data): cross-entropy; ``soft=True`` uses the target's whole distribution
  instead, as EAGLE's code does (``ploss``).

Partial alignment (FSPAD) needs no separate loss function: the head returns two features and the
feature loss reads ``regress_features`` while the token loss reads the logits of
``logit_features``; for the other variants both are the same tensor. The default weights are
EAGLE's and FSPAD's (feature 1.0, token 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sd2_ray.feature.features import TargetPass, target_pass
from sd2_ray.feature.head import FeatureHead, HeadOutput


@dataclass
class LossParts:
    total: torch.Tensor  # what to backpropagate
    feature: torch.Tensor  # Smooth L1 to the target's next feature
    token: torch.Tensor  # cross-entropy to the target's next token
    accuracy: float  # share of real positions whose argmax is the target's next token


def feature_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smooth L1 per element, mean over the hidden width, mean over positions where ``mask``."""
    per_position = F.smooth_l1_loss(predicted, target.to(predicted.dtype), reduction="none").mean(-1)
    return _masked_mean(per_position, mask)


def token_loss(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor, soft: bool = False):
    """Cross-entropy of the head's logits against the target's next token (or distribution)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    if soft:
        per_position = -(torch.softmax(target_logits.float(), dim=-1) * log_q).sum(-1)
    else:
        per_position = -log_q.gather(-1, target_logits.argmax(-1, keepdim=True)).squeeze(-1)
    return _masked_mean(per_position, mask)


def head_inputs(head: FeatureHead, tp: TargetPass, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(features, next_ids, pair_mask) for positions j = 0..T-2: a pair is real when both x_j and
    x_{j+1} are (left or right padding)."""
    mask = attention_mask.bool()
    pair_mask = mask[:, :-1] & mask[:, 1:]
    return head.reduce_features(tp.features[:, :-1]), input_ids[:, 1:], pair_mask


def feature_head_loss(
    head: FeatureHead,
    target,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    feature_weight: float = 1.0,
    token_weight: float = 0.1,
    soft: bool = False,
) -> LossParts:
    """One batch's loss. ``loss_mask`` (B, T), optional: 1 where the token at a position counts as
    a target to learn (e.g. the response, not the prompt); it masks the *predicted* position j+1."""
    tp = target_pass(target, input_ids, attention_mask, head.config.feature_layers)
    features, next_ids, pair_mask = head_inputs(head, tp, input_ids, attention_mask)
    out = head(features, next_ids, pair_mask)
    mask = pair_mask if loss_mask is None else pair_mask & loss_mask[:, 1:].bool()
    return combine(out, tp, mask, feature_weight, token_weight, soft)


def combine(
    out: HeadOutput, tp: TargetPass, mask: torch.Tensor, feature_weight: float, token_weight: float, soft: bool
) -> LossParts:
    """The weighted sum, with the targets shifted to the position each output predicts."""
    next_feature, next_logits = tp.top[:, 1:], tp.logits[:, 1:]
    feature = feature_loss(out.regress_features, next_feature, mask)
    token = token_loss(out.logits, next_logits, mask, soft)
    with torch.no_grad():
        agree = (out.logits.argmax(-1) == next_logits.argmax(-1)) & mask
        accuracy = float(agree.sum()) / max(1, int(mask.sum()))
    return LossParts(feature_weight * feature + token_weight * token, feature, token, accuracy)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)
