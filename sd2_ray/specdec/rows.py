"""A request's running state in a speculative decode loop, shared by every loop that verifies
drafts with :func:`sd2_ray.specdec.sampling.verify` (the draft-model engine, the feature-head
decoders): how committed tokens are emitted (up to a stop id or the budget), how the acceptance
counters are kept, and how each row draws its uniforms. One copy, so that MAL and the sampled
outputs mean the same thing whichever drafter produced them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from sd2_ray.specdec.types import GenerationRequest, SpecStats, TokenCallback


@dataclass
class Row:
    index: int  # position in the caller's request list
    request: GenerationRequest
    stop_ids: frozenset
    stats: SpecStats
    generator: torch.Generator | None  # None for greedy rows (they draw nothing)
    tokens: list[int] = field(default_factory=list)  # committed (emitted) tokens
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)

    @classmethod
    def start(cls, index: int, req: GenerationRequest, k: int, eos_ids: tuple[int, ...]) -> Row:
        """A fresh row: its own seeded generator when sampled, counters sized for ``k`` drafts."""
        generator = None
        if not req.sampling.greedy:
            seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        stats = SpecStats(num_speculative_tokens=k, accepted_per_position=[0] * k)
        return cls(index, req, frozenset(eos_ids) | frozenset(req.stop_token_ids), stats, generator)

    def commit(self, tokens: list[int], accepted: int, drafted: int, on_tokens: TokenCallback | None) -> list[int]:
        """Emit one pass's tokens (accepted drafts + correction/bonus) up to a stop id or the
        budget, count the pass, call back; returns what was emitted."""
        emitted = []
        for token in tokens:
            emitted.append(token)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            if len(self.tokens) + len(emitted) >= self.request.max_new_tokens:
                self.finish_reason = "length"
                break
        self.tokens.extend(emitted)
        stats = self.stats
        stats.target_passes += 1
        stats.committed_tokens += len(emitted)
        if drafted:
            # drafts past a stop id or the budget were accepted but never emitted: not counted
            accepted_emitted = min(accepted, len(emitted))
            stats.num_drafts += 1
            stats.num_draft_tokens += drafted
            stats.num_accepted_tokens += accepted_emitted
            for j in range(accepted_emitted):
                stats.accepted_per_position[j] += 1
        if on_tokens is not None and on_tokens(self.index, emitted) and self.finish_reason is None:
            self.finish_reason = "stop"
        return emitted


def start_rows(requests: list[GenerationRequest], k: int, eos_ids: tuple[int, ...]) -> list[Row]:
    """Rows of a batch of requests (an empty prompt is an error); zero budgets finish at once."""
    for i, req in enumerate(requests):
        if not req.prompt_ids:
            raise ValueError(f"request {i}: empty prompt_ids")
    rows = [Row.start(i, req, k, eos_ids) for i, req in enumerate(requests)]
    for row in rows:
        if row.request.max_new_tokens <= 0:
            row.finish_reason = "length"
    return rows


def row_uniforms(rows: list[Row], k: int, device=None) -> torch.Tensor:
    """(B, 2k+1) uniforms per row from its own generator, the same layout every pass (so a
    seeded request's draws don't depend on its batch): [0, k) drafting, [k, 2k) acceptance
    tests, 2k the resample / bonus token. Greedy rows draw nothing. Drawn on the CPU (the
    generators live there, so a seed means the same draws on any device), then moved."""
    size = 2 * k + 1
    if all(row.generator is None for row in rows):
        return torch.zeros(len(rows), size, device=device)
    out = torch.zeros(len(rows), size, device="cpu")
    for i, row in enumerate(rows):
        if row.generator is not None:
            out[i] = torch.rand(size, generator=row.generator)
    return out.to(device)
