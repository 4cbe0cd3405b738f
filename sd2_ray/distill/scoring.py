"""The target's distribution per response token: what ``logprobs_top_k`` stores (no Ray).

**Which distribution.** For every response token, the k most likely ids of the target's
next-token distribution *at temperature 1* — the log-softmax of its raw logits, before
temperature, top-p, or any other sampling transform — and their log-probabilities, sorted
from the most likely down. Why temperature 1: it is the model's own distribution, the same
whatever the distillation's sampling settings, the same from both engines (vLLM's default
``logprobs_mode`` is ``raw_logprobs``, which is this), and any serving temperature can be
derived from it at training time (:mod:`sd2_ray.finetune.losses`). Position i of a row's
lists belongs to ``response_ids[i]``: the distribution the target produced it from,
conditioned on the prompt and ``response_ids[:i]``.

Three sources, one result (``(ids int32 (n, k), logprobs float32 (n, k))`` numpy arrays):
the transformers engine's generation logits (:func:`generation_topk`), a teacher-forced
target forward over given continuations (:func:`score_continuations`, on-policy mode), and
the per-token logprob dicts of a ``ray.data.llm`` vLLM row (:func:`vllm_topk`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TopK = tuple[np.ndarray, np.ndarray]


def empty_topk(k: int) -> TopK:
    return np.zeros((0, k), dtype=np.int32), np.zeros((0, k), dtype=np.float32)


def topk_of_logits(logits, k: int) -> TopK:
    """(n, V) raw logits -> the top-k ids and temperature-1 log-probs per row, most likely first."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1, sorted=True)
    return top.indices.to(torch.int32).cpu().numpy(), top.values.cpu().numpy()


def generation_topk(step_logits, lengths: list[int], k: int) -> list[TopK]:
    """Per row, the top-k of its first ``lengths[row]`` generation steps; ``step_logits`` is
    ``generate(output_logits=True)``'s tuple of (B, V) raw logits, one per step."""
    steps = max(lengths, default=0)
    if not steps:
        return [empty_topk(k) for _ in lengths]
    ids, values = [], []
    for logits in step_logits[:steps]:  # one (B, V) step at a time: no (B, steps, V) copy
        i, v = topk_of_logits(logits, k)
        ids.append(i)
        values.append(v)
    ids_all, values_all = np.stack(ids, axis=1), np.stack(values, axis=1)  # (B, steps, k)
    return [(ids_all[row, :n], values_all[row, :n]) for row, n in enumerate(lengths)]


def score_continuations(
    model, prompts: list[list[int]], continuations: list[list[int]], k: int, pad_id: int, device: str = "cpu"
) -> list[TopK]:
    """Teacher-forced: one target forward over each ``prompt + continuation`` (left-padded, with
    the position ids generation would use) -> the top-k at every continuation token."""
    import torch

    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    width, keep = max(len(s) for s in seqs), max(len(c) for c in continuations) + 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        ).logits
    out = []
    for row, cont in enumerate(continuations):
        n = len(cont)  # logits at column c predict column c + 1: the last n+1 columns, minus the last
        out.append(topk_of_logits(logits[row, keep - 1 - n : keep - 1], k) if n else empty_topk(k))
    return out


def vllm_topk(position_logprobs: Any, k: int, length: int) -> TopK:
    """The top-k of a ray.data.llm output row's ``logprobs`` (one ``{token_id: {logprob, rank,
    decoded_token}}`` per generated token; vLLM adds the sampled token when it is not among the
    k, so each position is re-sorted and cut to k), for its first ``length`` tokens."""
    ids = np.zeros((length, k), dtype=np.int32)
    values = np.zeros((length, k), dtype=np.float32)
    for pos in range(length):
        pairs = _logprob_pairs(position_logprobs[pos])
        if len(pairs) < k:
            raise ValueError(f"vLLM returned {len(pairs)} log-probs at position {pos}, fewer than k={k}")
        pairs.sort(key=lambda p: -p[1])
        ids[pos] = [p[0] for p in pairs[:k]]
        values[pos] = [p[1] for p in pairs[:k]]
    return ids, values


def _logprob_pairs(entry: Any) -> list[tuple[int, float]]:
    """(token id, log-prob) pairs of one position, whatever container Ray Data delivered it in:
    a dict keyed by id (int or str) whose values are Logprob dicts; missing keys as None."""
    items = entry.items() if hasattr(entry, "items") else entry
    pairs = []
    for token, info in items:
        if info is None:
            continue
        value = info.get("logprob") if hasattr(info, "get") else info
        if value is None:
            continue
        pairs.append((int(token), float(value)))
    return pairs


# Both engines cut their raw generations with these two; they live here, below both engine
# modules, so the vLLM settings need not import the transformers engine (which imports them).
def split_at_eos(generated: list[int], eos_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated sequence at its first EOS (padding follows it in a batch)."""
    for pos, token in enumerate(generated):
        if token in eos_ids:
            return generated[:pos], "stop"
    return generated, "length" if len(generated) >= max_new_tokens else "stop"


def with_stop_token(generated: list[int], kept: list[int]) -> list[int]:
    """The response ids to store: the kept ids plus the EOS that ended them, when one did
    (training then learns to stop where the target stopped)."""
    if len(generated) > len(kept):
        return list(kept) + [int(generated[len(kept)])]
    return list(kept)
