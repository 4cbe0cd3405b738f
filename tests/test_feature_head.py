"""Feature heads (EAGLE / FSPAD) on tiny random targets: chain decoding with a head is lossless
(greedy equals the target's own greedy decoding; sampling follows the target's distribution, and a
wrong acceptance rule is caught), a trained head drafts from the features (MAL rises), every
variant trains and round-trips through save/load, and the target's weights never move."""

from __future__ import annotations

import math
import time

import pytest
import torch

from sd2_ray.feature.config import FeatureHeadConfig, low_mid_high_layers
from sd2_ray.feature.decode import FeatureSpecDecoder, total_stats
from sd2_ray.feature.features import target_features
from sd2_ray.feature.head import FeatureHead
from sd2_ray.feature.losses import feature_head_loss
from sd2_ray.feature.tree import TreeSpecDecoder
from sd2_ray.specdec.sampling import RowParams, warp_probs
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.testing.engine_pairs import hf_greedy, sharpen
from sd2_ray.testing.feature_heads import padded, train_head
from sd2_ray.testing.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = ["eagle", "fspad", "fspad-sampling", "fspad-pad"]
PROMPT_LENGTHS = [5, 11, 2, 8, 3, 6]


def prompts_for(n: int, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist() for i in range(n)]


def new_head(target, variant: str = "eagle", seed: int = 1, **overrides) -> FeatureHead:
    torch.manual_seed(seed)
    return FeatureHead(FeatureHeadConfig.for_target(target.config, variant, **overrides), target)


def greedy_run(target, head, prompts, k: int, n: int):
    results = FeatureSpecDecoder(target, head, k).generate([GenerationRequest(p, n) for p in prompts])
    return [r.token_ids for r in results], total_stats(results)


# ---- greedy: token for token the target's own decoding ------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_target_greedy_untrained_head(k):
    target = tiny_model("llama", seed=0)
    prompts = prompts_for(6)
    outputs, stats = greedy_run(target, new_head(target), prompts, k, 16)
    assert outputs == [hf_greedy(target, p, 16) for p in prompts]
    assert stats.num_speculative_tokens == k and 1.0 <= stats.mean_accepted_length <= k + 1
    assert stats.target_passes >= len(prompts) and stats.num_draft_tokens > 0


@pytest.fixture(scope="module")
def trained_pair():
    """A tiny target, an untrained head and the same head trained on the target's own greedy
    continuations of a handful of prompts (a few dozen steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the function-scoped one_torch_thread
    target = tiny_model("llama", seed=0)
    prompts = prompts_for(6, seed=3)
    seqs = [p + hf_greedy(target, p, 24) for p in prompts]
    untrained = new_head(target)
    trained = new_head(target)
    losses = train_head(trained, target, seqs, steps=40)
    torch.set_num_threads(threads)
    yield target, prompts, untrained, trained, losses


def test_trained_head_drafts_from_features_and_stays_lossless(trained_pair):
    target, prompts, untrained, trained, losses = trained_pair
    assert losses[-1] < losses[0]
    out_before, before = greedy_run(target, untrained, prompts, 3, 24)
    start = time.perf_counter()
    out_after, after = greedy_run(target, trained, prompts, 3, 24)
    seconds = time.perf_counter() - start
    reference = [hf_greedy(target, p, 24) for p in prompts]
    # many accepted drafts per pass: the verified-feature bookkeeping is exercised, still exact
    assert out_before == reference and out_after == reference
    print(f"MAL untrained {before.mean_accepted_length:.3f}, trained {after.mean_accepted_length:.3f} ({seconds:.2f}s)")
    print(f"acceptance by position {[round(a, 3) for a in after.per_position_acceptance()]}")
    assert after.mean_accepted_length > before.mean_accepted_length + 0.5
    assert after.per_position_acceptance()[0] > 0.5


def test_kv_cached_chain_equals_recompute_on_trained_head(trained_pair):
    """The cached chain (target and head KV caches, rolled back to the verified positions) drafts
    exactly what the full recomputation drafts: same tokens and per-row counters, greedy and
    sampled (same seeds, same uniforms); target-only decoding on the cache stays exact."""
    target, prompts, _, trained, _ = trained_pair
    sampled = [SamplingParams(0.8, 0.95, 0, seed=i) for i in range(len(prompts))]
    requests = [GenerationRequest(p, 20 + i) for i, p in enumerate(prompts)]
    requests += [GenerationRequest(p, 16, sp) for p, sp in zip(prompts, sampled, strict=True)]
    cached = FeatureSpecDecoder(target, trained, 3).generate(requests)
    recomputed = FeatureSpecDecoder(target, trained, 3, kv_cache=False).generate(requests)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert [r.stats for r in cached] == [r.stats for r in recomputed]
    assert total_stats(cached[: len(prompts)]).mean_accepted_length > 2.0  # many accepted drafts
    plain = FeatureSpecDecoder(target, trained, 3).generate(requests[: len(prompts)], speculate=False)
    assert [r.token_ids for r in plain] == [hf_greedy(target, p, 20 + i) for i, p in enumerate(prompts)]


def test_kv_cached_chain_on_growing_target_cache(trained_pair, monkeypatch):
    """A target whose attention takes no 4D mask keeps the growing cache (holes for rejected
    drafts): still the recomputation's tokens and counters."""
    import sd2_ray.feature.cached as cached_module

    monkeypatch.setattr(cached_module, "supports_static", lambda model: False)
    target, prompts, _, trained, _ = trained_pair
    requests = [GenerationRequest(p, 16) for p in prompts]
    cached = FeatureSpecDecoder(target, trained, 3).generate(requests)
    recomputed = FeatureSpecDecoder(target, trained, 3, kv_cache=False).generate(requests)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert [r.stats for r in cached] == [r.stats for r in recomputed]


def test_budgets_one_token_prompts_and_stop_ids(trained_pair):
    """Budgets of 0 and 1, a one-token prompt, and a stop id met inside an accepted draft."""
    target, prompts, _, trained, _ = trained_pair
    stop = hf_greedy(target, prompts[1], 6)[3]
    requests = [
        GenerationRequest([7], 5),
        GenerationRequest(prompts[0], 0),
        GenerationRequest(prompts[2], 1),
        GenerationRequest(prompts[1], 12, stop_token_ids=(stop,)),
    ]
    results = FeatureSpecDecoder(target, trained, 3).generate(requests)
    assert [r.finish_reason for r in results] == ["length", "length", "length", "stop"]
    assert results[0].token_ids == hf_greedy(target, [7], 5)
    assert results[1].token_ids == [] and results[2].token_ids == hf_greedy(target, prompts[2], 1)
    expected = hf_greedy(target, prompts[1], 12)
    assert results[3].token_ids == expected[: expected.index(stop) + 1]


def test_multi_layer_features_greedy_lossless():
    """EAGLE-3-style input (low/mid/high layers concatenated, reduced by a trainable map)."""
    target = tiny_model("llama", seed=0, layers=3)
    layers = low_mid_high_layers(3)
    assert layers == (1, 3)  # 3 blocks: the first block's output and the LM head's input
    head = new_head(target, "fspad", feature_layers=layers)
    ids, mask = padded(prompts_for(3))
    assert target_features(target, ids, mask, layers).shape[-1] == 2 * target.config.hidden_size
    parts = feature_head_loss(head, target, ids, mask)
    parts.total.backward()
    assert head.reduce is not None and head.reduce.weight.grad is not None
    prompts = prompts_for(4, seed=1)
    outputs, _ = greedy_run(target, head, prompts, 2, 10)
    assert outputs == [hf_greedy(target, p, 10) for p in prompts]


# ---- sampling: the output distribution is the target's ----------------------------------------

VOCAB = 8


def next_probs(target, seqs: list[list[int]], sp: SamplingParams) -> torch.Tensor:
    """The warped target's next-token distribution after each sequence: (len(seqs), V)."""
    with torch.no_grad():
        logits = target(torch.tensor(seqs)).logits[:, -1:]
    return warp_probs(logits, RowParams.from_params([sp] * len(seqs)))[:, 0]


def exact_joints(target, prompt, sp: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """P(tokens 1, 2) and P(tokens 2, 3) under the warped target, each (V, V)."""
    first = next_probs(target, [prompt], sp)[0]
    second = next_probs(target, [prompt + [a] for a in range(VOCAB)], sp)  # [a, b] = P(b | a)
    third = next_probs(target, [prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)], sp)
    joint12 = first.unsqueeze(1) * second
    joint23 = (joint12.unsqueeze(-1) * third.view(VOCAB, VOCAB, VOCAB)).sum(0)
    return joint12, joint23


def sampled_joints(decoder, prompt, sp: SamplingParams, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    requests = [
        GenerationRequest(prompt, 3, SamplingParams(sp.temperature, sp.top_p, sp.top_k, seed=s)) for s in range(n)
    ]
    counts12, counts23 = torch.zeros(VOCAB, VOCAB), torch.zeros(VOCAB, VOCAB)
    for r in decoder.generate(requests):
        counts12[r.token_ids[0], r.token_ids[1]] += 1
        counts23[r.token_ids[1], r.token_ids[2]] += 1
    return counts12 / n, counts23 / n


def tv_bound(p: torch.Tensor, n: int) -> float:
    """Three times the expected TV distance of an n-sample empirical distribution from p."""
    return 3 * 0.5 * torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum().item()


def sampled_tvs(make_decoder, sp: SamplingParams, n: int = 4000, n_broken: int | None = None):
    """TV distances of the joints of tokens 1-2 and 2-3 from the exact ones, for a decoder with
    the right rule and one that always accepts, and their bounds; ``make_decoder(target, head,
    accept_rule)``."""
    target = sharpen(tiny_model("llama", seed=0, vocab_size=VOCAB), 6.0)
    head = new_head(target, "fspad")
    prompt = [3, 5, 4, 6]
    exact = exact_joints(target, prompt, sp)
    bounds = [tv_bound(e.flatten(), n) for e in exact]

    def tv(decoder) -> list[float]:
        got = sampled_joints(decoder, prompt, sp, n)
        return [0.5 * (g - e).abs().sum().item() for g, e in zip(got, exact, strict=True)]

    good, good_bounds = tv(make_decoder(target, head, None)), bounds
    if n_broken is not None:  # a broken rule is far off: fewer samples show it
        n = n_broken
        bounds = [tv_bound(e.flatten(), n) for e in exact]
    broken = tv(make_decoder(target, head, lambda *args: True))
    return (good, good_bounds), (broken, bounds)


@pytest.mark.parametrize("sp", [SamplingParams(1.0), SamplingParams(0.7, 0.9, 5)], ids=["plain", "warped"])
def test_sampling_matches_target_distribution_and_catches_broken_rule(sp):
    """Token 1 comes from the prompt pass; tokens 2 and 3 from the first drafting pass (the head's
    first draft, then its second draft or the correction), so both joints are checked."""

    def chain(target, head, rule):
        return FeatureSpecDecoder(target, head, 2, eos_token_ids=(), accept_rule=rule)

    check_tvs(*sampled_tvs(chain, sp))


def check_tvs(good, broken) -> None:
    print(f"TV (tokens 1-2, 2-3) and bounds: good {good}, broken {broken}")
    assert all(t < b for t, b in zip(*good, strict=True)), good
    assert all(t > b for t, b in zip(*broken, strict=True)), broken  # always accepting = the head's


def test_mixed_batch_greedy_rows_unaffected_by_sampled_neighbours(trained_pair):
    target, prompts, _, trained, _ = trained_pair
    sampled = SamplingParams(0.8, 0.95, 0, seed=7)
    requests = [GenerationRequest(p, 12, SamplingParams() if i % 2 == 0 else sampled) for i, p in enumerate(prompts)]
    results = FeatureSpecDecoder(target, trained, 3).generate(requests)
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        if i % 2 == 0:
            assert r.token_ids == hf_greedy(target, p, 12)
        else:
            assert 1 <= len(r.token_ids) <= 12


# ---- training and checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_one_step_and_round_trips(variant, tmp_path):
    target = tiny_model("llama", seed=0)
    head = new_head(target, variant)
    ids, mask = padded(prompts_for(4))
    losses = train_head(head, target, [p + [7, 8, 9] for p in prompts_for(4)], steps=1)
    assert math.isfinite(losses[0])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.trainable_parameters())
    keys = set(head.state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)  # the target's parts are not the head's
    assert ("regress_proj.weight" in keys) == (variant in ("fspad", "fspad-pad"))
    assert ("fuse.gate_proj.weight" in keys) == (variant in ("fspad", "fspad-sampling"))
    head.save(tmp_path / "head")
    loaded = FeatureHead.load(tmp_path / "head", target)
    assert loaded.config == head.config
    head.eval()
    with torch.no_grad():
        features = head.reduce_features(target_features(target, ids, mask))[:, :-1]
        a, b = head(features, ids[:, 1:], mask[:, 1:]), loaded(features, ids[:, 1:], mask[:, 1:])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.regress_features, b.regress_features)
    prompts = prompts_for(3, seed=2)
    assert greedy_run(target, head, prompts, 2, 8) == greedy_run(target, loaded, prompts, 2, 8)


def test_training_leaves_target_weights_unchanged():
    target = tiny_model("llama", seed=0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    head = new_head(target, "fspad")
    train_head(head, target, [p + [7, 8, 9, 10] for p in prompts_for(4)], steps=5)
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in target.parameters())
    own = {id(p) for p in head.parameters()}
    assert not own & {id(p) for p in target.parameters()}


# ---- tree drafting (EAGLE-2): lossless, and at least the chain's MAL ------------------------------


@pytest.mark.parametrize("shape", [(3, 2, 5), (4, 4, 16)], ids=["narrow", "wide"])
def test_tree_greedy_equals_target_greedy_untrained_head(shape):
    target = tiny_model("llama", seed=0)
    prompts = prompts_for(6)
    results = TreeSpecDecoder(target, new_head(target, "fspad"), *shape).generate(
        [GenerationRequest(p, 16) for p in prompts]
    )
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 16) for p in prompts]
    stats = total_stats(results)
    assert stats.num_speculative_tokens == shape[0] and 1.0 <= stats.mean_accepted_length <= shape[0] + 1


def test_tree_on_trained_head_lossless_budgets_and_mal_at_least_chain(trained_pair):
    """Same tokens as the target (and stop ids, budgets); the tree keeps the chain's path in
    most passes and adds siblings, so its MAL is at least the chain's at the same depth."""
    target, prompts, _, trained, _ = trained_pair
    tree = TreeSpecDecoder(target, trained, depth=3, top_k=4, total_tokens=16)
    results = tree.generate([GenerationRequest(p, 24) for p in prompts])
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 24) for p in prompts]
    _, chain = greedy_run(target, trained, prompts, 3, 24)
    mal = total_stats(results).mean_accepted_length
    print(f"MAL tree {mal:.3f}, chain {chain.mean_accepted_length:.3f}")
    assert mal >= chain.mean_accepted_length and mal > 2.0
    stop = hf_greedy(target, prompts[1], 6)[3]
    sampled = GenerationRequest(prompts[3], 10, SamplingParams(0.8, seed=5))
    requests = [GenerationRequest([7], 5), GenerationRequest(prompts[0], 0), GenerationRequest(prompts[2], 1)]
    requests += [GenerationRequest(prompts[1], 12, stop_token_ids=(stop,)), sampled]
    results = tree.generate(requests)
    assert [r.finish_reason for r in results] == ["length", "length", "length", "stop", "length"]
    assert results[0].token_ids == hf_greedy(target, [7], 5) and results[1].token_ids == []
    expected = hf_greedy(target, prompts[1], 12)
    assert results[3].token_ids == expected[: expected.index(stop) + 1]
    assert results[4].token_ids == tree.generate([sampled])[0].token_ids  # a row's draws are its own


def test_tree_of_one_branch_is_the_chain(trained_pair):
    """top_k 1 and depth nodes make the tree the head's greedy chain: the same drafts and
    counters as the chain at K = depth, so the tree's head cache (verified features replacing
    predicted ones, tree entries dropped) matches the chain's."""
    target, prompts, _, trained, _ = trained_pair
    requests = [GenerationRequest(p, 20 + i) for i, p in enumerate(prompts)]
    tree = TreeSpecDecoder(target, trained, depth=3, top_k=1, total_tokens=3).generate(requests)
    chain = FeatureSpecDecoder(target, trained, 3).generate(requests)
    assert [r.token_ids for r in tree] == [r.token_ids for r in chain]
    assert [r.stats for r in tree] == [r.stats for r in chain]


@pytest.mark.parametrize("sp", [SamplingParams(1.0), SamplingParams(0.7, 0.9, 5)], ids=["plain", "warped"])
def test_tree_sampling_matches_target_distribution_and_catches_broken_rule(sp):
    """Depth 2, three siblings per node out of a vocabulary of 8: tokens 2 and 3 come from the
    first tree pass, through the recursive rejection over siblings (decoded per row: fewer
    samples than the chain's test, within their own bounds)."""

    def tree(target, head, rule):
        return TreeSpecDecoder(target, head, 2, 3, 5, eos_token_ids=(), accept_rule=rule)

    check_tvs(*sampled_tvs(tree, sp, n=800, n_broken=300))
