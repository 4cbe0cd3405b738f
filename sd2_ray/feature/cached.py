"""The feature chain on KV caches: what :class:`~sd2_ray.feature.decode.FeatureSpecDecoder`
runs by default.

Two caches, both the speculative engine's (:mod:`sd2_ray.specdec.static_kv`, or the growing
:mod:`sd2_ray.specdec.kv` for a target whose attention takes no 4D mask):

* the target's holds every committed token but the newest; a pass scores only ``[uncached
  committed token(s), K drafts]`` (the whole prompt in the first pass) with
  ``output_hidden_states``, then rolls back the rejected drafts;
* the head's holds one entry per *verified* position j: its decoder layer's keys and values for
  (target feature f_j, token x_{j+1}). Drafting first feeds the positions verified since the last
  pass (their features come from the target's last pass), then K - 1 single steps on the head's
  own predicted features; those K - 1 entries are dropped right after drafting, so the next pass
  extends the cache with the target's features of the positions it accepted instead (EAGLE's
  recomputation over verified features).

Both caches put padding on the left of a chunk and count positions in real tokens, so a row's
drafts and verification do not depend on the other rows of its batch.
"""

from __future__ import annotations

import torch

from sd2_ray.feature.features import layer_features
from sd2_ray.feature.head import FeatureHead
from sd2_ray.specdec.kv import RaggedKV, right_aligned
from sd2_ray.specdec.sampling import RowParams, fit_vocab, pick
from sd2_ray.specdec.static_kv import StaticKV, supports_static


class HeadAsModel:
    """What a :class:`StaticKV` reads of its model, for a feature head: the 1-layer Llama config
    of its decoder layer (eager attention, so the cache's additive 4D mask is taken), its dtype,
    its input device, and a call that runs :meth:`FeatureHead.step` on the cache."""

    def __init__(self, head: FeatureHead):
        self.head = head
        self.config = head.layer.self_attn.config
        self.dtype = head.layer.self_attn.q_proj.weight.dtype  # the input norm may be an Identity (EAGLE-1)

    def get_input_embeddings(self):
        return self.head.frozen.embed

    def __call__(self, **inputs):
        return self.head.step(**inputs)


class CachedChain:
    """The rows' caches and what is not in them yet: committed target ids (``pending``) and
    verified (feature, next id) pairs (``head_features``, ``head_ids``)."""

    def __init__(
        self, target, head: FeatureHead, prompts: list[list[int]], vocab: int, capacity: int, drafting: bool = True
    ):
        self.target, self.head, self.vocab = target, head, vocab
        self.layers = head.config.feature_layers
        self.device = target.get_input_embeddings().weight.device
        batch = len(prompts)
        if supports_static(target):
            self.target_kv: StaticKV | RaggedKV = StaticKV(target, batch, capacity)
        else:
            self.target_kv = RaggedKV(target, batch)
        self.head_kv = StaticKV(HeadAsModel(head), batch, capacity)
        self.drafting = drafting  # False: target-only decoding, no features kept
        self.pending = prompts  # committed target ids not in the target's cache
        self.head_features: list[list[torch.Tensor]] = [[] for _ in prompts]  # verified, not in the head's cache
        self.head_ids: list[list[int]] = [[] for _ in prompts]  # the token after each of those positions
        self._scored: torch.Tensor | None = None  # the last score's features (B, width, H)

    def draft(self, k: int, rp: RowParams, uniforms: torch.Tensor):
        """(drafts (B, k), warped head probabilities (B, k, V) or None when all rows are greedy)."""
        batch = len(self.pending)
        if k == 0:
            return torch.zeros(batch, 0, dtype=torch.long, device=self.device), None
        features, ids, real = self._head_chunk()
        out = self.head_kv.outputs(real, features=features, next_ids=ids)
        one = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        tokens, probs = [], []
        for j in range(k):
            token, prob = pick(fit_vocab(out.logits[:, -1], self.vocab), rp, uniforms[:, j])
            tokens.append(token)
            probs.append(prob)
            if j < k - 1:  # the head's own feature and token: the next step's input
                out = self.head_kv.outputs(one, features=out.regress_features[:, -1:], next_ids=token.unsqueeze(1))
        # the chain's predicted features leave the cache: verified ones replace them next pass
        self.head_kv.drop_last(torch.full((batch,), k - 1, dtype=torch.long, device=self.device))
        return torch.stack(tokens, dim=1), None if rp.all_greedy else torch.stack(probs, dim=1)

    def _head_chunk(self):
        """The verified pairs not in the head's cache, right-aligned: (features, ids, real)."""
        ids, real = right_aligned(self.head_ids, self.device)
        first = self.head_features[0][0]
        features = first.new_zeros(*ids.shape, first.shape[-1])
        for i, parts in enumerate(self.head_features):
            row = torch.cat(parts)
            features[i, ids.shape[1] - row.shape[0] :] = row
        self.head_features = [[] for _ in self.head_features]
        self.head_ids = [[] for _ in self.head_ids]
        return features, ids, real

    def score(self, drafts: torch.Tensor) -> torch.Tensor:
        """Target logits (B, k+1, V) before each draft and after the last; keeps the features of
        the scored columns for :meth:`advance`."""
        k = drafts.shape[1]
        tokens, real = right_aligned([p + d for p, d in zip(self.pending, drafts.tolist(), strict=True)], self.device)
        out = self.target_kv.outputs(real, input_ids=tokens, logits_to_keep=k + 1, output_hidden_states=self.drafting)
        if self.drafting:
            self._scored = self.head.reduce_features(layer_features(out.hidden_states, self.layers).to(self.device))
        return out.logits[:, -(k + 1) :].to(self.device)

    def advance(self, drafts: list[list[int]], accepted: list[int], next_tokens: list[int]) -> None:
        """Roll the target's cache back to the accepted drafts; queue the newly verified features
        (uncached tokens and accepted drafts) for the head; the next token becomes pending."""
        counts = [len(d) - a for d, a in zip(drafts, accepted, strict=True)]
        self.target_kv.drop_last(torch.tensor(counts, dtype=torch.long, device=self.device))
        for i, pending in enumerate(self.pending):
            a, k = accepted[i], len(drafts[i])
            if self.drafting:
                assert self._scored is not None  # set by score, which every advance follows
                width = self._scored.shape[1]
                verified = pending + drafts[i][:a] + [next_tokens[i]]
                self.head_features[i].append(self._scored[i, width - k - len(pending) : width - k + a])
                self.head_ids[i].extend(verified[1:])
            self.pending[i] = [next_tokens[i]]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.target_kv.select(index)
        self.head_kv.select(index)
        self.pending = [self.pending[i] for i in keep]
        self.head_features = [self.head_features[i] for i in keep]
        self.head_ids = [self.head_ids[i] for i in keep]
