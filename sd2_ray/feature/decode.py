"""Lossless chain speculative decoding with a feature head (EAGLE-style drafting), batched.

Each pass, for every row with committed tokens x_0..x_{n-1}:

1. the head drafts K tokens: its input is the target's features f_0..f_{n-2} (from the last
   verification pass; the feature of the newest token x_{n-1} does not exist yet) paired with the
   embeddings of x_1..x_{n-1}; its output at the last position gives the first draft and a
   predicted feature, which is fed back (with the draft's embedding) for the next draft, and so on:
   the chain reuses the target's last verified features and the head's own predictions after them;
2. the target scores x_0..x_{n-1} + the K drafts in one pass, which also yields its features for
   every accepted position;
3. ``sd2_ray.specdec.sampling.verify`` (the project's rule) accepts a prefix and picks the
   correction / bonus token: greedy rows keep the target's argmax, sampled rows follow the target's
   (warped) distribution exactly, whatever the head proposes.

The first pass is a plain target pass over the prompts (no features exist before it): it counts as
a target pass that commits one token, so MAL here includes it, as in EAGLE's decoding.

Correctness over speed (first slice): no KV cache anywhere. The target is recomputed over each
row's whole sequence every pass and the head over its whole feature sequence every draft step;
rows are left-padded with position ids that count real tokens, so a row's outputs do not depend on
its batch. Randomness follows the speculative engine's layout: per request a seeded generator
draws (2K + 1) uniforms each pass ([0, K) drafting, [K, 2K) acceptance tests, 2K resample/bonus).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd2_ray.feature.features import target_pass
from sd2_ray.feature.head import FeatureHead
from sd2_ray.specdec.engine import eos_ids_of, output_vocab_size
from sd2_ray.specdec.rows import Row, row_uniforms
from sd2_ray.specdec.sampling import RowParams, fit_vocab, pick, verify
from sd2_ray.specdec.types import GenerationRequest, GenerationResult, SpecStats, TokenCallback


@dataclass
class _Row(Row):
    context: list[int] = field(default_factory=list)  # prompt + committed tokens
    features: torch.Tensor | None = None  # (len(context) - 1, H): the target's, in the head's input space


@dataclass
class _Drafts:
    tokens: torch.Tensor  # (B, k)
    lengths: torch.Tensor  # (B,) how many of them each row may use (its budget)
    probs: torch.Tensor | None  # (B, k, V) warped head distributions; None when all rows are greedy


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
    ):
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        self.target = target.eval()
        self.head = head.eval()
        self.num_speculative_tokens = num_speculative_tokens
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(target)
        self.accept_rule = accept_rule  # tests swap in a wrong rule to show the checks catch it
        self.vocab = output_vocab_size(target)
        self.device = target.get_input_embeddings().weight.device

    def generate(
        self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None, speculate: bool = True
    ) -> list[GenerationResult]:
        for i, req in enumerate(requests):
            if not req.prompt_ids:
                raise ValueError(f"request {i}: empty prompt_ids")
        rows = [self._new_row(i, req) for i, req in enumerate(requests)]
        live = [row for row in rows if row.request.max_new_tokens > 0]
        for row in rows:
            if row.request.max_new_tokens <= 0:
                row.finish_reason = "length"
        with torch.inference_mode():
            if live:
                self._decode(live, on_tokens, speculate)
        return [GenerationResult(row.tokens, row.finish_reason or "length", row.stats) for row in rows]

    def _new_row(self, i: int, req: GenerationRequest) -> _Row:
        row = _Row.start(i, req, self.num_speculative_tokens, self.eos_token_ids)
        row.context = list(req.prompt_ids)
        return row

    def _decode(self, rows: list[_Row], on_tokens, speculate: bool) -> None:
        rp = RowParams.from_params([row.request.sampling for row in rows], device=self.device)
        K = self.num_speculative_tokens
        first = True  # the prompt pass: no features to draft from yet
        while rows:
            k = 0 if first or not speculate else min(K, max(row.remaining for row in rows) - 1)
            uniforms = row_uniforms(rows, K, self.device)
            drafts = self._draft(rows, k, rp, uniforms[:, :k])
            logits, features = self._score(rows, drafts.tokens)
            accepted, next_token = verify(
                logits,
                drafts.tokens,
                drafts.lengths,
                drafts.probs,
                rp,
                uniforms[:, K : K + k],
                uniforms[:, 2 * K],
                self.accept_rule,
            )
            self._commit_all(rows, drafts, accepted.tolist(), next_token.tolist(), features, on_tokens)
            first = False
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                if keep:
                    rp = rp.select(torch.tensor(keep, dtype=torch.long, device=self.device))

    def _draft(self, rows: list[_Row], k: int, rp: RowParams, uniforms: torch.Tensor) -> _Drafts:
        """k chained head steps over every row's feature sequence (recomputed each step)."""
        lengths = torch.tensor([min(k, row.remaining - 1) for row in rows], dtype=torch.long, device=self.device)
        if k == 0:
            return _Drafts(torch.zeros(len(rows), 0, dtype=torch.long, device=self.device), lengths, None)
        features, next_ids, mask = self._head_inputs(rows)
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
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        stacked = None if rp.all_greedy else torch.stack(probs, dim=1)
        return _Drafts(torch.stack(tokens, dim=1), lengths, stacked)

    def _head_inputs(self, rows: list[_Row]):
        """Left-padded (features, next token ids, mask) of the rows' verified positions."""
        width = max(len(row.context) - 1 for row in rows)
        hidden = self.head.config.hidden_size
        first_features = rows[0].features
        assert first_features is not None  # set by the prompt pass
        features = first_features.new_zeros(len(rows), width, hidden)
        next_ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            n = len(row.context) - 1
            assert row.features is not None and row.features.shape[0] == n
            features[i, width - n :] = row.features
            next_ids[i, width - n :] = torch.tensor(row.context[1:], dtype=torch.long)
            mask[i, width - n :] = True
        return features, next_ids, mask

    def _score(self, rows: list[_Row], drafts: torch.Tensor):
        """The target over context + drafts, left-padded: logits (B, k+1, V) at the last k+1
        positions, and each row's features (in the head's input space) over its real columns."""
        k = drafts.shape[1]
        draft_lists = drafts.tolist()
        sequences = [row.context + draft_lists[i] for i, row in enumerate(rows)]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = True
        tp = target_pass(self.target, ids, mask, self.head.config.feature_layers)
        features = self.head.reduce_features(tp.features)
        return tp.logits[:, width - k - 1 :], features

    def _commit_all(self, rows, drafts: _Drafts, accepted, next_tokens, features, on_tokens) -> None:
        k = drafts.tokens.shape[1]
        draft_lists, lengths = drafts.tokens.tolist(), drafts.lengths.tolist()
        width = features.shape[1]
        for i, row in enumerate(rows):
            a = accepted[i]
            n = len(row.context)
            # verified features: the old context and the accepted drafts (columns before the
            # unaccepted drafts); the newest token's feature comes with the next pass
            start = width - n - k
            row.features = features[i, start : start + n + a].clone()
            row.context.extend(row.commit(draft_lists[i][:a] + [next_tokens[i]], a, lengths[i], on_tokens))


def total_stats(results: list[GenerationResult]) -> SpecStats:
    """The requests' counters summed (MAL over a batch)."""
    total = SpecStats()
    for result in results:
        total = total.merge(result.stats)
    return total
