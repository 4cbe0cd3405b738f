"""Teacher-forced acceptance (sd2_ray/finetune/acceptance.py): the pieces against hand cases and
dense references, then against the real speculative engine on a tiny target/drafter pair.

Observed against the engine (tiny sharpened Llama target, drafter = target + weight noise,
K = 4, 8 prompts x 24 tokens): the greedy replay equals the engine's greedy MAL exactly at
noise 0.1 / 0.3 / 0.6 (3.200, 1.641, 1.272); at temperature 1 with the full vocabulary stored,
the α replay was within 1-3 % of the engine's sampled MAL over 64 rows (4.165 vs 4.073,
3.41 vs 3.38, 2.65 vs 2.68) while the per-position α formula, which ignores the budget cap,
was 9-10 % high.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from test_losses import V, labelled, make_batch

from sd2_ray.finetune import data as D
from sd2_ray.finetune.acceptance import (
    acceptance_sums,
    add_sums,
    expected_mal_iid,
    expected_rounds,
    summarize,
    teacher_forced,
)


def test_expected_rounds_hand_cases():
    assert expected_rounds([1.0] * 10, 4) == 2  # 5 + 5 tokens
    assert expected_rounds([0.0] * 10, 4) == 10
    # K=2: round at 0 accepts 1 (a1 = 0) and commits 2; at 2 accepts 2, commits 3; at 5 the last token
    assert expected_rounds([1, 0, 1, 1, 1, 1], 2) == 3
    assert expected_rounds([], 4) == 0


def test_expected_rounds_matches_a_monte_carlo_of_the_engine_loop():
    rng = random.Random(0)
    alpha = [rng.random() for _ in range(15)]
    k, trials, total = 3, 40000, 0
    for _ in range(trials):
        start = 0
        while start < len(alpha):
            budget, run = min(k, len(alpha) - start - 1), 0
            while run < budget and rng.random() < alpha[start + run]:
                run += 1
            start += run + 1
            total += 1
    assert expected_rounds(alpha, k) == pytest.approx(total / trials, rel=0.01)


def test_expected_mal_formula():
    alpha = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert expected_mal_iid(alpha, 2).tolist() == [1.0, 1.75, 3.0]


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_alpha_against_the_dense_sum_of_minima(temperature):
    compare = temperature or 1.0
    for k in (V, 3):
        target, drafter, batch = make_batch(k=k, seed=11)
        sums = acceptance_sums(drafter, batch, 4, temperature)
        b, t = labelled(batch["labels"])
        p = torch.softmax(target[b, t] / compare, -1)
        q = torch.softmax(drafter[b, t].double() / compare, -1)
        exact = torch.minimum(p, q).sum(-1)
        assert sums["positions"] == len(b)
        if k == V:
            assert sums["alpha"] == pytest.approx(float(exact.sum()), rel=1e-4)
            assert sums["alpha_upper"] == pytest.approx(sums["alpha"], rel=1e-4)
            assert sums["mal_alpha"] == pytest.approx(float(expected_mal_iid(exact, 4).sum()), rel=1e-4)
        else:  # the rest bucket bounds the truth from both sides
            assert sums["alpha"] <= float(exact.sum()) + 1e-4 <= sums["alpha_upper"] + 2e-4
        agree = (drafter[b, t].argmax(-1) == target[b, t].argmax(-1)).sum()
        assert sums["greedy_accepted"] == float(agree)


def test_rows_without_top_k_are_skipped_and_summaries_pick_by_temperature():
    _, drafter, batch = make_batch(k=4, seed=12)
    assert acceptance_sums(drafter, {"labels": batch["labels"]}, 4)["positions"] == 0
    assert summarize(acceptance_sums(drafter, {"labels": batch["labels"]}, 4))["positions"] == 0
    full = acceptance_sums(drafter, batch, 4)
    batch["topk_mask"][0] = False
    part = acceptance_sums(drafter, batch, 4)
    assert part["positions"] < full["positions"] and part["rows"] == full["rows"] - 1
    total = add_sums([full, part])
    assert total["positions"] == full["positions"] + part["positions"]
    greedy, sampled = summarize(full, 0.0), summarize(full, 0.7)
    assert greedy["expected_mal"] == greedy["expected_mal_greedy"]
    assert sampled["expected_mal"] == sampled["expected_mal_alpha_replay"]
    assert 1.0 <= greedy["expected_mal"] <= 5.0 and 0.0 <= greedy["alpha"] <= greedy["alpha_upper"] <= 1.0


# ---------------------------------------------------------------- against the speculative engine

TEXTS = [
    "the cat sat",
    "a quick brown fox",
    "hello world",
    "to be or not",
    "x y z",
    "lorem ipsum dolor",
    "one two",
    "abc",
]
K, NEW_TOKENS = 4, 24


@pytest.fixture(scope="module")
def tiny_target():
    from sd2_ray.testing.engine_pairs import sharpen
    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import char_tokenizer

    tok = char_tokenizer()
    return sharpen(tiny_model("llama", seed=0, vocab_size=len(tok))), tok


def noisy_copy(model, noise: float):
    """A drafter that agrees with the target often but not always."""
    drafter = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return drafter


def engine_rows(target, drafter, tok, temperature: float, repeats: int):
    """(prompt ids, generated ids) per request and the engine's MAL over all of them."""
    from sd2_ray.specdec.engine import SpeculativeEngine
    from sd2_ray.specdec.types import GenerationRequest, SamplingParams, SpecStats

    engine = SpeculativeEngine(target, drafter, K, tok, tok)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    stats, rows = SpecStats(), []
    for rep in range(repeats):
        sampling = [
            SamplingParams(temperature=temperature, seed=100 * rep + i) if temperature else SamplingParams()
            for i in range(len(prompts))
        ]
        results = engine.generate([GenerationRequest(p, NEW_TOKENS, s) for p, s in zip(prompts, sampling, strict=True)])
        for prompt, result in zip(prompts, results, strict=True):
            stats = stats.merge(result.stats)
            rows.append((prompt, result.token_ids))
    return rows, stats.mean_accepted_length


def scored_batch(target, rows, k: int):
    """The rows as a distilled batch: the target's top-k scored teacher-forced (as on-policy
    distillation stores it; generation-time top-k are equal, tests/test_distill_topk.py)."""
    from sd2_ray.distill.scoring import score_continuations

    scored = score_continuations(target, [p for p, _ in rows], [c for _, c in rows], k, pad_id=0)
    examples = [
        D.Example(p + c, [D.IGNORE_INDEX] * len(p) + c, torch.from_numpy(ids), torch.from_numpy(lps), len(p))
        for (p, c), (ids, lps) in zip(rows, scored, strict=True)
    ]
    return D.collate(examples, pad_id=0)


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_greedy_replay_predicts_the_engines_greedy_mal(tiny_target, noise, one_torch_thread):
    target, tok = tiny_target
    drafter = noisy_copy(target, noise)
    rows, measured = engine_rows(target, drafter, tok, 0.0, 1)
    predicted = teacher_forced(drafter, [scored_batch(target, rows, 8)], K, temperature=0.0)
    assert 1.2 < measured < K + 1  # neither all nor nothing accepted: the check has something to match
    # only floating-point ties between the batched forward and the engine's cached one could differ
    assert predicted["expected_mal"] == pytest.approx(measured, rel=0.01)
    assert predicted["greedy_acceptance"] < 1.0


def test_alpha_replay_predicts_the_engines_sampled_mal(tiny_target, one_torch_thread):
    target, tok = tiny_target
    drafter = noisy_copy(target, 0.3)
    rows, measured = engine_rows(target, drafter, tok, 1.0, 8)
    predicted = teacher_forced(drafter, [scored_batch(target, rows, len(tok))], K, temperature=1.0)
    assert predicted["alpha"] == pytest.approx(predicted["alpha_upper"], abs=1e-4)  # full support
    # sampling noise of 64 rows and independence between positions: observed within 1-3 %
    assert predicted["expected_mal"] == pytest.approx(measured, rel=0.08)
    assert predicted["expected_mal_alpha"] > predicted["expected_mal"]  # the formula ignores the budget


def test_spearman_rank_correlation():
    from sd2_ray.finetune.acceptance import ranks, spearman

    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # textbook case without ties: 1 - 6 Σd² / (n(n² - 1)) with d = (0, 1, -1, 0, 0) -> 1 - 12/120
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # with ties: Pearson of the average ranks [1.5, 1.5, 3, 4] and [1, 2, 3, 4] = 0.9487
    assert spearman([2, 2, 5, 7], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1.0], [2.0])
