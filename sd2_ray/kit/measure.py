"""A simple greedy speculative-decoding check: how many of a drafter's K greedy tokens the
target's own greedy continuation would accept (used for kit.json; the real engine lives in
``sd2_ray.specdec``).

For one prompt: the target greedily continues it; then, pass by pass, the drafter proposes K
greedy tokens from the committed prefix, the matched prefix is accepted and the target adds
one token (the bonus or the correction), so each pass commits ``matched + 1`` tokens.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_continuation(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def greedy_mal(
    target, drafter, prompts: list[list[int]], k: int = 4, max_new_tokens: int = 32, eos_id: int | None = None
) -> dict:
    """MAL (tokens committed per target pass, bonus included) of ``drafter`` for ``target``."""
    passes = committed = accepted = 0
    per_position = [0] * k
    for prompt in prompts:
        continuation = greedy_continuation(target, prompt, max_new_tokens, eos_id)
        pos = 0
        while pos < len(continuation):
            want = continuation[pos : pos + k]
            draft = greedy_continuation(drafter, prompt + continuation[:pos], len(want), None)
            matched = 0
            while matched < len(want) and matched < len(draft) and draft[matched] == want[matched]:
                per_position[matched] += 1
                matched += 1
            step = min(matched + 1, len(continuation) - pos)
            passes += 1
            committed += step
            accepted += matched
            pos += step
    drafts = passes
    return {
        "mean_accepted_length": committed / passes if passes else 0.0,
        "target_passes": passes,
        "committed_tokens": committed,
        "accepted_tokens": accepted,
        "per_position_acceptance": [a / drafts if drafts else 0.0 for a in per_position],
        "num_speculative_tokens": k,
    }
