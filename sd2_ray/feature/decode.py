"""Lossless chain speculative decoding with a feature head (EAGLE-style drafting), batched.

Each pass, for every row with committed tokens x_0..x_{n-1}:

1. the head drafts K tokens: its input is the target's features f_0..f_{n-2} (from the
   verification passes; the feature of the newest token x_{n-1} does not exist yet) paired with
   the embeddings of x_1..x_{n-1}; its output at the last position gives the first draft and a
   predicted feature, which is fed back (with the draft's embedding) for the next draft, and so on:
   the chain reuses the target's verified features and the head's own predictions after them;
2. the target scores the K drafts in one pass, which also yields its features for every
   accepted position;
3. ``sd2_ray.specdec.sampling.verify`` (the project's rule) accepts a prefix and picks the
   correction / bonus token: greedy rows keep the target's argmax, sampled rows follow the target's
   (warped) distribution exactly, whatever the head proposes.

The first pass is a plain target pass over the prompts (no features exist before it): it counts as
a target pass that commits one token, so MAL here includes it, as in EAGLE's decoding.

Two ways to compute the same thing (``kv_cache``):

* cached (default, :mod:`sd2_ray.feature.cached`): the target and the head keep KV caches across
  passes; the target scores only its uncached token(s) + the K drafts, the head only the newly
  verified features, and both caches drop what verification rejected;
* recompute (:class:`Recompute`, the reference the cached path is tested against): the target is
  recomputed over each row's whole sequence every pass and the head over its whole feature
  sequence every draft step.

Rows are left-padded with position ids that count real tokens, so a row's outputs do not depend
on its batch. Randomness follows the speculative engine's layout
(:func:`sd2_ray.specdec.rows.row_uniforms`): per request a seeded generator draws (2K + 1)
uniforms each pass ([0, K) drafting, [K, 2K) acceptance tests, 2K resample/bonus).
"""

from __future__ import annotations

import torch

from sd2_ray.feature.features import target_pass
from sd2_ray.feature.head import FeatureHead
from sd2_ray.specdec.engine import eos_ids_of, output_vocab_size
from sd2_ray.specdec.rows import Row, row_uniforms, start_rows
from sd2_ray.specdec.sampling import RowParams, fit_vocab, pick, verify
from sd2_ray.specdec.static_kv import round_capacity
from sd2_ray.specdec.types import GenerationRequest, GenerationResult, SpecStats, TokenCallback


class FeatureSpecDecoder:
    """The :class:`sd2_ray.specdec.types.Engine` contract with a feature head as the drafter."""

    def __init__(
        self,
        target,
        head: FeatureHead,
        num_speculative_tokens: int = 3,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        accept_rule=None,
        kv_cache: bool = True,
    ):
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        self.target = target.eval()
        self.head = head.eval()
        self.num_speculative_tokens = num_speculative_tokens
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(target)
        self.accept_rule = accept_rule  # tests swap in a wrong rule to show the checks catch it
        self.kv_cache = kv_cache
        self.vocab = output_vocab_size(target)
        self.device = target.get_input_embeddings().weight.device

    def generate(
        self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None, speculate: bool = True
    ) -> list[GenerationResult]:
        rows = start_rows(requests, self.num_speculative_tokens, self.eos_token_ids)
        live = [row for row in rows if row.finish_reason is None]
        with torch.inference_mode():
            if live:
                self._decode(live, on_tokens, speculate)
        return [GenerationResult(row.tokens, row.finish_reason or "length", row.stats) for row in rows]

    def _new_chain(self, rows: list[Row], speculate: bool):
        prompts = [list(row.request.prompt_ids) for row in rows]
        if not self.kv_cache:
            return Recompute(self.target, self.head, prompts, self.vocab)
        from sd2_ray.feature.cached import CachedChain

        # a row holds its prompt, its budget and at most K + 1 tokens in flight
        longest = max(len(p) + row.request.max_new_tokens for p, row in zip(prompts, rows, strict=True))
        capacity = round_capacity(longest + self.num_speculative_tokens + 1)
        return CachedChain(self.target, self.head, prompts, self.vocab, capacity, drafting=speculate)

    def _decode(self, rows: list[Row], on_tokens, speculate: bool) -> None:
        rp = RowParams.from_params([row.request.sampling for row in rows], device=self.device)
        K = self.num_speculative_tokens
        chain = self._new_chain(rows, speculate)
        first = True  # the prompt pass: no features to draft from yet
        while rows:
            k = 0 if first or not speculate else min(K, max(row.remaining for row in rows) - 1)
            uniforms = row_uniforms(rows, K, self.device)
            # a row never drafts past its own budget, so its tokens don't depend on its batch
            lengths = torch.tensor([min(k, row.remaining - 1) for row in rows], dtype=torch.long, device=self.device)
            drafts, probs = chain.draft(k, rp, uniforms[:, :k])
            logits = chain.score(drafts)
            accepted, next_token = verify(
                logits, drafts, lengths, probs, rp, uniforms[:, K : K + k], uniforms[:, 2 * K], self.accept_rule
            )
            acc, nxt, lens, draft_lists = accepted.tolist(), next_token.tolist(), lengths.tolist(), drafts.tolist()
            chain.advance(draft_lists, acc, nxt)
            for i, row in enumerate(rows):
                row.commit(draft_lists[i][: acc[i]] + [nxt[i]], acc[i], lens[i], on_tokens)
            first = False
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                if keep:
                    rp = rp.select(torch.tensor(keep, dtype=torch.long, device=self.device))
                    chain.select(keep)


class Recompute:
    """The chain without any KV cache: each row's context and verified features, recomputed in
    full every step (the reference the cached chain is tested against)."""

    def __init__(self, target, head: FeatureHead, prompts: list[list[int]], vocab: int):
        self.target, self.head, self.vocab = target, head, vocab
        self.device = target.get_input_embeddings().weight.device
        self.contexts = prompts  # prompt + committed tokens
        self.features: list[torch.Tensor | None] = [None] * len(prompts)  # (len(context) - 1, H) each
        self._scored: torch.Tensor | None = None  # the last score's features (B, width, H)

    def draft(self, k: int, rp: RowParams, uniforms: torch.Tensor):
        """k chained head steps over every row's feature sequence (recomputed each step)."""
        if k == 0:
            return torch.zeros(len(self.contexts), 0, dtype=torch.long, device=self.device), None
        features, next_ids, mask = self._head_inputs()
        tokens, probs = [], []
        for j in range(k):
            out = self.head(features, next_ids, mask)
            token, prob = pick(fit_vocab(out.logits[:, -1], self.vocab), rp, uniforms[:, j])
            tokens.append(token)
            probs.append(prob)
            # the head's own feature and token become the next step's input (left padding: the
            # last column is every row's newest position)
            features = torch.cat([features, out.regress_features[:, -1:]], dim=1)
            next_ids = torch.cat([next_ids, token.unsqueeze(1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(self.contexts), 1)], dim=1)
        return torch.stack(tokens, dim=1), None if rp.all_greedy else torch.stack(probs, dim=1)

    def _head_inputs(self):
        """Left-padded (features, next token ids, mask) of the rows' verified positions."""
        width = max(len(c) - 1 for c in self.contexts)
        first = self.features[0]
        assert first is not None  # set by the prompt pass
        features = first.new_zeros(len(self.contexts), width, self.head.config.hidden_size)
        next_ids = torch.zeros(len(self.contexts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(self.contexts), width, dtype=torch.bool, device=self.device)
        for i, (context, row_features) in enumerate(zip(self.contexts, self.features, strict=True)):
            n = len(context) - 1
            assert row_features is not None and row_features.shape[0] == n
            features[i, width - n :] = row_features
            next_ids[i, width - n :] = torch.tensor(context[1:], dtype=torch.long)
            mask[i, width - n :] = True
        return features, next_ids, mask

    def score(self, drafts: torch.Tensor) -> torch.Tensor:
        """The target over context + drafts, left-padded: logits (B, k+1, V) at the last k+1
        positions; keeps each row's features (in the head's input space) for :meth:`advance`."""
        k = drafts.shape[1]
        sequences = [c + d for c, d in zip(self.contexts, drafts.tolist(), strict=True)]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(sequences), width, dtype=torch.bool, device=self.device)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = True
        tp = target_pass(self.target, ids, mask, self.head.config.feature_layers)
        self._scored = self.head.reduce_features(tp.features)
        return tp.logits[:, width - k - 1 :]

    def advance(self, drafts: list[list[int]], accepted: list[int], next_tokens: list[int]) -> None:
        scored = self._scored
        assert scored is not None  # set by score, which every advance follows
        width = scored.shape[1]
        for i, context in enumerate(self.contexts):
            a, n, k = accepted[i], len(context), len(drafts[i])
            # verified features: the old context and the accepted drafts (columns before the
            # unaccepted drafts); the newest token's feature comes with the next pass
            start = width - n - k
            self.features[i] = scored[i, start : start + n + a].clone()
            context.extend(drafts[i][:a] + [next_tokens[i]])

    def select(self, keep: list[int]) -> None:
        self.contexts = [self.contexts[i] for i in keep]
        self.features = [self.features[i] for i in keep]


def total_stats(results: list[GenerationResult]) -> SpecStats:
    """The requests' counters summed (MAL over a batch)."""
    total = SpecStats()
    for result in results:
        total = total.merge(result.stats)
    return total
