"""The module DeepSpeed trains (pure torch): the drafter behind a forward that returns its loss.

Memory: :class:`CausalLMLoss` never materialises full-vocabulary fp32 logits for the whole
batch. It runs the decoder, then the LM head and the loss over chunks of positions, each chunk
recomputed in the backward pass (activation checkpointing), so the logits held at any moment
are ``chunk x vocab`` (a 128k vocabulary at 2048 positions would otherwise be 1 GB per row).
Its parameters are the drafter's under the prefix ``lm.``
(:data:`sd2_ray.finetune.checkpoint.LM_PREFIX`), which the checkpoints keep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sd2_ray.finetune.acceptance import acceptance_sums
from sd2_ray.finetune.losses import LossSpec, LossSums, loss_sum

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class CausalLMLoss(torch.nn.Module):
    """What DeepSpeed trains: the HF causal LM (``.lm``, saved as the drafter) behind a forward
    that returns the configured loss (:class:`~sd2_ray.finetune.losses.LossSpec`: cross-entropy
    or a divergence to the target's stored top-k) *summed* over the labelled positions.

    The decoder runs once; the LM head and the loss run per chunk of labelled positions under
    activation checkpointing (:func:`sd2_ray.finetune.losses.loss_sum`). Models whose logits are
    post-processed (soft-capping, a logit scale) use their own forward instead, unchunked, so
    the loss is always the model's. The step reads the sums behind the returned total (ce and
    divergence apart) from ``last``; with ``acceptance_k`` the forward also scores the
    teacher-forced acceptance of the same positions into ``last_acceptance`` (held-out evals)."""

    def __init__(self, lm: PreTrainedModel, spec: LossSpec | None = None):
        super().__init__()
        self.lm = lm
        self.spec = spec or LossSpec()
        self.last: LossSums | None = None  # of the latest forward
        self.last_acceptance: dict[str, float] | None = None
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        special = any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale"))
        self.chunked = not special and hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        topk_mask: torch.Tensor | None = None,
        acceptance_k: int = 0,
    ) -> torch.Tensor:
        batch = {"labels": labels, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "topk_mask": topk_mask}
        if self.chunked:
            outputs = self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            head = self.lm.get_output_embeddings()
        else:
            outputs = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            head = None
        self.last = sums = loss_sum(outputs, batch, self.spec, head)
        if acceptance_k:
            self.last_acceptance = acceptance_sums(
                outputs, batch, acceptance_k, self.spec.temperature, self.spec.chunk_tokens, head
            )
        return sums.total
