"""Batched, per-row sampling math for speculative decoding (pure torch, no models).

Every function takes per-row sampling parameters as tensors so one batch can mix greedy and
sampled requests with different temperature / top-k / top-p. Randomness comes in as uniforms
drawn by the caller from each request's own seeded generator, so a request's draws never depend
on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd2_ray.specdec.types import SamplingParams


@dataclass
class RowParams:
    """Sampling parameters of the rows of a batch, as tensors of shape (B,), plus two host-side
    flags, so that choosing a code path never reads a tensor back (no device sync in a draft
    step, and a fixed path inside a compiled graph)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float, 1.0 where greedy (never divided by zero)
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float, 1.0 = off
    all_greedy: bool  # every row greedy
    filters: bool  # some row uses top-k or top-p

    @classmethod
    def from_params(cls, params: list[SamplingParams], device=None) -> RowParams:
        return cls(
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            temperature=torch.tensor(
                [p.temperature if not p.greedy else 1.0 for p in params], dtype=torch.float32, device=device
            ),
            top_k=torch.tensor([max(0, p.top_k) for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            all_greedy=all(p.greedy for p in params),
            filters=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
        )

    def select(self, rows: torch.Tensor) -> RowParams:
        """Keep these rows (requests leave the batch between passes: reading the flags back
        here is outside any draft step)."""
        rows = rows.to(self.greedy.device)
        greedy, top_k, top_p = self.greedy[rows], self.top_k[rows], self.top_p[rows]
        return RowParams(
            greedy,
            self.temperature[rows],
            top_k,
            top_p,
            bool(greedy.all()),
            bool((top_k > 0).any() or (top_p < 1.0).any()),
        )

    def to(self, device) -> RowParams:
        """The same rows on another device (a drafter on its own GPU); no copy when already there."""
        return RowParams(
            self.greedy.to(device),
            self.temperature.to(device),
            self.top_k.to(device),
            self.top_p.to(device),
            self.all_greedy,
            self.filters,
        )


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Drafter logits over the target's id range: extra ids cut, missing ids impossible."""
    have = logits.shape[-1]
    if have == vocab:
        return logits
    if have > vocab:
        return logits[..., :vocab]
    pad = logits.new_full(logits.shape[:-1] + (vocab - have,), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def warp_probs(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Probabilities after temperature, then top-k, then top-p (HF order), per row.

    ``logits``: (B, T, V). The same function is applied to target and drafter logits, which is
    what keeps speculative sampling exact for the *warped* target distribution.
    """
    logits = logits.float() / rp.temperature.view(-1, 1, 1)
    if not rp.filters:
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).view(1, 1, -1)
    k = torch.where(rp.top_k > 0, rp.top_k, torch.full_like(rp.top_k, vocab)).view(-1, 1, 1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (mass_before < rp.top_p.view(-1, 1, 1)) | (rank == 0)  # the top token always survives
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    warped = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(warped, dim=-1)


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (B, V) probabilities (need not sum to 1) and (B,) uniforms -> (B,) ids.

    A token with zero mass is never returned (its CDF step is empty).
    """
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


def pick(logits: torch.Tensor, rp: RowParams, uniforms: torch.Tensor):
    """Next token per row from (B, V) logits: argmax for greedy rows, sampled otherwise.

    Returns (ids (B,), warped probabilities (B, V) or None when every row is greedy).
    """
    greedy_ids = logits.argmax(dim=-1)
    if rp.all_greedy:
        return greedy_ids, None
    probs = warp_probs(logits.unsqueeze(1), rp).squeeze(1)
    sampled = sample(probs, uniforms)
    return torch.where(rp.greedy, greedy_ids, sampled), probs


def verify(
    target_logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_len: torch.Tensor,
    draft_probs: torch.Tensor | None,
    rp: RowParams,
    u_accept: torch.Tensor,
    u_resample: torch.Tensor,
    accept_rule=None,
):
    """Verify drafts against the target; returns (accepted (B,), next_token (B,)).

    ``target_logits`` (B, k+1, V): the target's logits at the position before each draft token
    and after the last one. ``drafts`` (B, k) target ids, row i meaningful up to ``draft_len[i]``.
    ``draft_probs`` (B, k, V): the (warped) distribution each draft token was sampled from (None
    when every row is greedy: the drafter then returns none).
    Greedy rows accept while the draft equals the target's argmax, then take the argmax.
    Sampled rows accept token j with probability min(1, p/q); the first rejected position is
    resampled from norm(max(0, p - q)); when all are accepted the bonus token comes from p.
    ``accept_rule(p_x, q_x, u) -> bool`` replaces the acceptance test (tests use it to show
    that a wrong rule is caught).
    """
    k = drafts.shape[1]
    in_draft = torch.arange(k, device=drafts.device).unsqueeze(0) < draft_len.unsqueeze(1)
    argmax = target_logits.argmax(dim=-1)  # (B, k+1)
    ok = drafts == argmax[:, :k]
    probs = None
    if not rp.all_greedy:
        probs = warp_probs(target_logits, rp)  # (B, k+1, V)
        if k:
            assert draft_probs is not None, "sampled rows' drafts come with their probabilities"
            p_x = probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            q_x = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            rule = accept_rule or (lambda p, q, u: u * q < p)  # u < p/q without dividing by q
            ok = torch.where(rp.greedy.unsqueeze(1), ok, rule(p_x, q_x, u_accept))
    accepted = (ok & in_draft).long().cumprod(dim=1).sum(dim=1)
    next_token = argmax.gather(1, accepted.unsqueeze(1)).squeeze(1)
    if probs is None:
        return accepted, next_token
    rows = torch.arange(len(accepted), device=accepted.device)
    dist = probs[rows, accepted]  # (B, V): p at the first rejected position, or the bonus position
    if k:
        assert draft_probs is not None  # as above
        rejected = accepted < draft_len
        q_at = draft_probs[rows, accepted.clamp(max=k - 1)]
        residual = (dist - q_at).clamp_(min=0.0)
        # p == q up to rounding leaves no residual mass; rejection then had ~zero probability
        usable = rejected & (residual.sum(-1) > 0)
        dist = torch.where(usable.unsqueeze(1), residual, dist)
    sampled = sample(dist, u_resample)
    return accepted, torch.where(rp.greedy, next_token, sampled)
