"""Acceptance of a drafter measured while training (pure torch, teacher-forced).

One forward of the drafter over held-out distilled rows (prompt + the target's response ids)
gives, at every response position with the target's stored top-k:

- **α** = Σ_{top-k ids} min(p_T, q_T): the probability that speculative *sampling* at
  temperature T accepts the drafter's token there (p, q tempered as in
  :mod:`sd2_ray.finetune.losses`). The ids outside the top-k add Σ_rest min(p, q), which lies
  in [0, min(p_rest, q_rest)]: ``alpha`` counts 0 for them (a lower bound, so expected MAL is
  never flattered by the truncation) and ``alpha_upper`` counts min(p_rest, q_rest). The gap
  is small when the top-k hold most of the target's mass (top-20 of a trained LLM) and wide
  for flat distributions.
- **greedy agreement**: the drafter's argmax equals the target's (the top stored id): for
  greedy serving this *is* the acceptance rule, per position, with no independence assumed.
- **expected MAL (α formula)**: (1 − α^{K+1}) / (1 − α) = Σ_{j=0..K} α^j per position,
  averaged (``expected_mal_alpha``): as if a whole round met that position's α, and ignoring
  the end of the response.

**Replay.** The engine's rounds are replayed on each row's per-position acceptance a_t: a
round starting at t drafts b = min(K, n − t − 1) tokens (the engine never drafts past the
budget), accepts a run of r with probability Π_{i<r} a_{t+i} · (1 − a_{t+r}) (r < b) or
Π_{i<b} a_{t+i} (r = b), commits r + 1 and the next round starts at t + r + 1. The expected
number of rounds follows by dynamic programming from the end; MAL = tokens / rounds summed
over rows, the engine's own definition. With the greedy indicator (a_t ∈ {0, 1}) the replay
is deterministic and, on rows the target wrote greedily, it *is* what ``sd2 eval`` measures at
temperature 0 (tests/test_acceptance_metric.py: equal to the engine's MAL). With α it is an
expectation under independent positions, budget included.

``expected_mal`` (what training reports and ``select_by: expected_mal`` ranks by) is the
replay: greedy replay for greedy serving (temperature 0, the default), α replay otherwise.
The α formula is reported beside it; it overestimates short rows (it ignores the budget cap:
+9-10 % against the engine on 24-token rows in the test, where the α replay is within 3 %).

Distributed use: each worker calls :func:`acceptance_sums` on its batches, the sums are added
over batches and workers (plain floats, all-reduce them), then :func:`summarize`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sd2_ray.finetune.losses import (
    chunk_starts,
    drafter_log_probs,
    labelled_positions,
    position_logits,
    target_log_probs,
)

SUM_KEYS = (
    "positions",
    "alpha",
    "alpha_upper",
    "mal_alpha",
    "greedy_accepted",
    "committed",
    "greedy_rounds",
    "alpha_rounds",
    "rows",
)


def expected_mal_iid(alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{j=0..K} α^j = (1 − α^{K+1}) / (1 − α), written as the sum so α = 1 gives K + 1."""
    powers = alpha.unsqueeze(-1) ** torch.arange(k + 1, dtype=alpha.dtype, device=alpha.device)
    return powers.sum(-1)


def expected_rounds(acceptance: list[float], k: int) -> float:
    """Expected target passes to commit a response whose per-position acceptance probabilities
    are ``acceptance`` (0/1 for greedy agreement), drafting up to ``k`` per round."""
    n = len(acceptance)
    rounds = [0.0] * (n + 1)  # rounds[t]: expected passes to finish from position t
    for t in range(n - 1, -1, -1):
        budget = min(k, n - t - 1)
        reach, expected = 1.0, 0.0  # reach = P(the first r drafts were accepted)
        for r in range(budget + 1):
            stop = reach * (1.0 - acceptance[t + r]) if r < budget else reach
            expected += stop * rounds[t + r + 1]
            if r < budget:
                reach *= acceptance[t + r]
        rounds[t] = 1.0 + expected
    return rounds[0]


def _position_stats(
    logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, ...]:
    """Per position: α (lower bound), α upper bound, expected MAL (α), greedy agreement."""
    logp = target_log_probs(logprobs, temperature)
    logq = drafter_log_probs(logits, ids, temperature)
    low = torch.minimum(logp[:, :-1].exp(), logq[:, :-1].exp()).sum(-1)
    high = low + torch.minimum(logp[:, -1].exp(), logq[:, -1].exp())
    target_top = ids.gather(-1, logprobs.float().argmax(-1, keepdim=True)).squeeze(-1)
    greedy = logits.argmax(-1) == target_top
    return low, high, expected_mal_iid(low.double(), k), greedy


@torch.no_grad()
def acceptance_sums(
    outputs: torch.Tensor,
    batch: dict,
    num_speculative_tokens: int,
    temperature: float = 0.0,
    chunk_tokens: int = 1024,
    head: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Sums over the batch's labelled positions that have the target's top-k (rows without it
    are skipped). ``outputs``: the drafter's (B, L, V) logits on ``batch`` (from
    :func:`sd2_ray.finetune.data.collate`), or its (B, L, H) last hidden states with its LM
    ``head`` (logits then exist for ``chunk_tokens`` positions at a time, as in the losses);
    ``temperature``: the serving temperature."""
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    if batch.get("topk_ids") is None:
        # no stored top-k in this rank's micro-batch: still as many (empty) LM-head calls as the
        # ranks that have some, which gather a ZeRO-3 partitioned head collectively
        flat, none = outputs.reshape(-1, outputs.shape[-1]), torch.zeros(0, dtype=torch.long, device=outputs.device)
        for _ in chunk_starts(0, chunk_tokens, head, flat.device):
            position_logits(flat, none, head)
        return sums
    labels = batch["labels"].to(outputs.device)
    pos = labelled_positions(labels, batch)
    assert pos.topk_ids is not None and pos.topk_logprobs is not None  # the batch has top-k
    keep = pos.has_topk
    rows, ids, lps = pos.rows[keep], pos.topk_ids[keep].long(), pos.topk_logprobs[keep]
    flat = outputs.reshape(-1, outputs.shape[-1])
    compare = temperature if temperature > 0 else 1.0
    greedy_parts, alpha_parts = [], []
    for start in chunk_starts(rows.numel(), chunk_tokens, head, flat.device):  # alike on every rank
        part = slice(start, start + chunk_tokens)
        low, high, mal, greedy = _position_stats(
            position_logits(flat, rows[part], head), ids[part], lps[part], num_speculative_tokens, compare
        )
        sums["alpha"] += float(low.sum())
        sums["alpha_upper"] += float(high.sum())
        sums["mal_alpha"] += float(mal.sum())
        sums["greedy_accepted"] += float(greedy.sum())
        greedy_parts.append(greedy.cpu())
        alpha_parts.append(low.cpu())
    sums["positions"] = float(rows.numel())
    if greedy_parts:
        _replay_rows(
            sums,
            rows.cpu() // labels.shape[1],
            torch.cat(greedy_parts).double(),
            torch.cat(alpha_parts).double(),
            num_speculative_tokens,
        )
    return sums


def _replay_rows(
    sums: dict[str, float], row_of: torch.Tensor, greedy: torch.Tensor, alpha: torch.Tensor, k: int
) -> None:
    """Replays per sequence (positions arrive sorted by row, then by position)."""
    for row in torch.unique_consecutive(row_of).tolist():
        mine = row_of == row
        sums["committed"] += float(mine.sum())
        sums["greedy_rounds"] += expected_rounds(greedy[mine].tolist(), k)
        sums["alpha_rounds"] += expected_rounds(alpha[mine].tolist(), k)
        sums["rows"] += 1


def add_sums(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    total = dict.fromkeys(SUM_KEYS, 0.0)
    for part in parts:
        for key in SUM_KEYS:
            total[key] += part[key]
    return total


def summarize(sums: dict[str, float], temperature: float = 0.0) -> dict[str, float]:
    """Metrics from summed counts: ``expected_mal`` is the greedy replay for greedy serving
    (temperature 0), else the α replay; every estimate is reported under its own name too."""
    n = sums["positions"]
    if not n:
        return {"expected_mal": float("nan"), "positions": 0}
    out = {
        "alpha": sums["alpha"] / n,
        "alpha_upper": sums["alpha_upper"] / n,
        "expected_mal_alpha": sums["mal_alpha"] / n,
        "greedy_acceptance": sums["greedy_accepted"] / n,
        "expected_mal_greedy": sums["committed"] / max(sums["greedy_rounds"], 1.0),
        "expected_mal_alpha_replay": sums["committed"] / max(sums["alpha_rounds"], 1.0),
        "positions": int(n),
        "rows": int(sums["rows"]),
    }
    out["expected_mal"] = out["expected_mal_greedy"] if temperature == 0 else out["expected_mal_alpha_replay"]
    return out


@torch.no_grad()
def teacher_forced(
    model, batches: Iterable[dict], num_speculative_tokens: int, temperature: float = 0.0
) -> dict[str, float]:
    """One-process convenience: the drafter ``model`` over collated batches -> :func:`summarize`."""
    device = next(model.parameters()).device
    parts = []
    for batch in batches:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        parts.append(acceptance_sums(out.logits, batch, num_speculative_tokens, temperature))
    return summarize(add_sums(parts), temperature)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties count fairly): how well
    expected MAL during training ranks checkpoints like the measured MAL does. NaN when either
    side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length lists of at least 2 values, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")
