"""The engine contract shared by eval, tune and serve: requests in, tokens + acceptance stats out.

Engines (our speculative engine, target-only decoding, cross-tokenizer pairs) all implement
:class:`Engine`. Token ids are always the *target's* ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# on_tokens(request_index, newly_committed_target_ids) -> True to stop that request now
# (used for streaming and for stop strings); called in commit order.
TokenCallback = Callable[[int, list[int]], bool | None]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SpecStats:
    """Counters like vLLM's spec-decode metrics, per request or summed over many."""

    num_speculative_tokens: int = 0
    target_passes: int = 0  # target verification forward passes (each commits >= 1 token)
    num_drafts: int = 0  # passes that verified a draft
    num_draft_tokens: int = 0  # tokens proposed by the drafter
    num_accepted_tokens: int = 0  # proposed tokens the target accepted
    committed_tokens: int = 0  # tokens emitted by verification passes (accepted + bonus/correction)
    accepted_per_position: list[int] = field(default_factory=list)  # [k] = drafts whose token k was accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target verification pass, bonus included (1 <= MAL <= K+1)."""
        return self.committed_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def per_position_acceptance(self) -> list[float]:
        """P(draft token k accepted) over all drafts, k = 0..K-1."""
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.accepted_per_position]

    def merge(self, other: SpecStats) -> SpecStats:
        size = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pad = lambda xs: list(xs) + [0] * (size - len(xs))  # noqa: E731
        return SpecStats(
            num_speculative_tokens=max(self.num_speculative_tokens, other.num_speculative_tokens),
            target_passes=self.target_passes + other.target_passes,
            num_drafts=self.num_drafts + other.num_drafts,
            num_draft_tokens=self.num_draft_tokens + other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens + other.num_accepted_tokens,
            committed_tokens=self.committed_tokens + other.committed_tokens,
            accepted_per_position=[
                a + b for a, b in zip(pad(self.accepted_per_position), pad(other.accepted_per_position), strict=True)
            ],
        )


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()  # in addition to the target's EOS ids
    images: tuple = ()  # pixel values (3, H, W), one per image block of the prompt (vision targets)


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated target ids (prompt excluded; a stop/EOS token included)
    finish_reason: str  # "stop" (EOS, stop token, or callback) | "length"
    stats: SpecStats


class Engine(Protocol):
    def generate(
        self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None, speculate: bool = True
    ) -> list[GenerationResult]:
        """Advance all requests together (batched) until each stops; mixed sampling params allowed."""
        ...
