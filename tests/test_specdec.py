"""The speculative engine is lossless: greedy equals the target's own greedy decoding (HF
``generate``), sampling follows the target's distribution, batched rows diverge correctly.
The engine-level tests run on both KV caches: static (the default) and the growing one."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.specdec.engine import SpeculativeEngine
from sd2_ray.specdec.kv import RaggedKV
from sd2_ray.specdec.sampling import RowParams, warp_probs
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.testing.engine_pairs import hf_greedy, noisy_copy, sharpen
from sd2_ray.testing.tiny import tiny_model


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only; a module-level set_grad_enabled(False) would leak into every later test file
    of the same process (fine-tuning tests then train nothing)."""
    with torch.no_grad():
        yield


PROMPT_LENGTHS = [5, 11, 2, 8, 3]


def prompts_for(n: int, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist() for i in range(n)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt_neox"])
def pair(request):
    target = sharpen(tiny_model(request.param, seed=0), 4.0)
    return request.param, target, noisy_copy(target, 0.6)


@pytest.fixture(params=["static", "growing"])
def make_engine(request):
    """SpeculativeEngine on one of the two KV caches."""
    return lambda *args, **kwargs: SpeculativeEngine(*args, static_cache=request.param == "static", **kwargs)


@pytest.mark.parametrize("batch,k", [(1, 1), (5, 3), (4, 5)])
def test_greedy_equals_target_greedy(pair, batch, k, make_engine):
    _, target, drafter = pair
    prompts = prompts_for(batch, seed=batch * 10 + k)
    refs = [hf_greedy(target, p, 24) for p in prompts]
    results = make_engine(target, drafter, k).generate([GenerationRequest(p, 24) for p in prompts])
    assert [r.token_ids for r in results] == refs
    for r, ref in zip(results, refs, strict=True):
        assert r.finish_reason == ("stop" if ref[-1] == 2 else "length")
        assert 1.0 <= r.stats.mean_accepted_length <= k + 1
        assert r.stats.committed_tokens == len(ref)


def test_rows_accept_different_lengths_and_stay_lossless(pair, make_engine):
    """Rows' acceptance differs: rollback by length (static) or holes and compaction (growing)."""
    _, target, drafter = pair
    prompts = prompts_for(6, seed=3)
    refs = [hf_greedy(target, p, 40, eos=None) for p in prompts]
    engine = make_engine(target, drafter, 4, eos_token_ids=())
    results = engine.generate([GenerationRequest(p, 40) for p in prompts])
    assert [r.token_ids for r in results] == refs
    per_row = {tuple(r.stats.accepted_per_position) for r in results}
    assert len(per_row) > 1, "drafter too good or too bad: rows never diverged"
    assert any(0 < r.stats.acceptance_rate < 1 for r in results)


def test_stop_token_mid_draft(pair, make_engine):
    _, target, _ = pair
    prompt = prompts_for(1, seed=5)[0]
    ref = hf_greedy(target, prompt, 20, eos=None)
    stop = ref[5]  # position 5 lies inside the second draft when K = 3 and drafter == target
    expected = ref[: ref.index(stop) + 1]
    for engine_kwargs, request_kwargs in (
        ({"eos_token_ids": ()}, {"stop_token_ids": (stop,)}),
        ({"eos_token_ids": (stop,)}, {}),
    ):
        engine = make_engine(target, target, 3, **engine_kwargs)
        result = engine.generate([GenerationRequest(prompt, 20, **request_kwargs)])[0]
        assert result.token_ids == expected and result.finish_reason == "stop"
        assert result.stats.committed_tokens == len(expected)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_drafter_equal_to_target_gives_mal_k_plus_one(pair, k):
    _, target, _ = pair
    prompts = prompts_for(3, seed=k)
    engine = SpeculativeEngine(target, target, k, eos_token_ids=())
    results = engine.generate([GenerationRequest(p, 3 * (k + 1)) for p in prompts])
    for r in results:
        assert r.stats.mean_accepted_length == k + 1
        assert r.stats.acceptance_rate == 1.0
        assert r.stats.target_passes == 3 and r.stats.accepted_per_position == [3] * k


def test_target_only_engine_is_greedy_and_counts_passes(pair, make_engine):
    _, target, _ = pair
    prompts = prompts_for(3, seed=9)
    results = make_engine(target, None).generate([GenerationRequest(p, 12) for p in prompts])
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 12) for p in prompts]
    assert all(r.stats.num_drafts == 0 and r.stats.target_passes == len(r.token_ids) for r in results)


def test_callback_streams_in_order_and_can_stop(pair, make_engine):
    _, target, drafter = pair
    prompts = prompts_for(3, seed=11)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_tokens(index, ids):
        seen[index].extend(ids)
        return index == 1 and len(seen[1]) >= 4  # stop request 1 early

    engine = make_engine(target, drafter, 3, eos_token_ids=())
    results = engine.generate([GenerationRequest(p, 16) for p in prompts], on_tokens=on_tokens)
    assert [seen[i] for i in range(3)] == [r.token_ids for r in results]
    assert results[1].finish_reason == "stop" and 4 <= len(results[1].token_ids) < 16
    assert results[0].finish_reason == "length" and len(results[0].token_ids) == 16
    assert results[1].token_ids == hf_greedy(target, prompts[1], 16, eos=None)[: len(results[1].token_ids)]


def test_mixed_batch_and_max_batch_size(pair, make_engine):
    _, target, drafter = pair
    prompts = prompts_for(4, seed=13)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=10, seed=1),
        SamplingParams(),
        SamplingParams(temperature=1.2, top_p=0.8, seed=2),
    ]
    engine = make_engine(target, drafter, 3, max_batch_size=3)
    results = engine.generate([GenerationRequest(p, 16, s) for p, s in zip(prompts, params, strict=True)])
    for i in (0, 2):
        assert results[i].token_ids == hf_greedy(target, prompts[i], 16)
    again = engine.generate([GenerationRequest(prompts[1], 16, params[1])])[0]
    assert again.token_ids == results[1].token_ids  # a seeded request reproduces


def test_edge_requests():
    target = tiny_model("llama")
    engine = SpeculativeEngine(target, target, 2)
    assert engine.generate([]) == []
    result = engine.generate([GenerationRequest([5, 6], 0)])[0]
    assert result.token_ids == [] and result.finish_reason == "length"
    with pytest.raises(ValueError, match="request 0"):
        engine.generate([GenerationRequest([], 4)])
    assert len(engine.generate([GenerationRequest([5], 1)])[0].token_ids) == 1


def test_ragged_kv_holes_and_compaction_keep_logits():
    model = tiny_model("qwen2", seed=3)
    tokens = torch.randint(3, 96, (2, 8))
    ones = lambda w: torch.ones(2, w, dtype=torch.bool)  # noqa: E731
    kv = RaggedKV(model, 2)
    kv.forward(tokens[:, :6], ones(6))
    kv.drop_last(torch.tensor([3, 0]))  # row 0 rejects 3: holes, 3 of 12 slots (no compaction yet)
    assert kv.width == 6 and kv.lengths.tolist() == [3, 6]
    step = kv.forward(tokens[:, 6:8], ones(2))[:, -1]  # row 0 now has holes in the middle
    ref0 = model(torch.cat([tokens[0, :3], tokens[0, 6:8]]).unsqueeze(0)).logits[0, -1]
    torch.testing.assert_close(step[0], ref0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1], model(tokens[1:, :8]).logits[0, -1], atol=1e-5, rtol=1e-4)
    kv.drop_last(torch.tensor([0, 2]))  # 5 holes of 16 slots: compacted to the longest row
    assert kv.width == 6 and kv.lengths.tolist() == [5, 6]
    nxt = torch.tensor([[7], [9]])
    out = kv.forward(nxt, ones(1))[:, -1]
    ref0 = model(torch.cat([tokens[0, :3], tokens[0, 6:8], nxt[0]]).unsqueeze(0)).logits[0, -1]
    ref1 = model(torch.cat([tokens[1, :6], nxt[1]]).unsqueeze(0)).logits[0, -1]
    torch.testing.assert_close(out[0], ref0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], ref1, atol=1e-5, rtol=1e-4)
    kv.select(torch.tensor([0]))  # row 1 leaves: the leading empty column goes too
    assert kv.width == 6 and kv.lengths.tolist() == [6]


def test_warp_probs_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 1, 50) * 3
    params = [SamplingParams(0.7, 0.9, 5), SamplingParams(1.3, 0.5, 0), SamplingParams(0.5, 1.0, 12)]
    ours = warp_probs(logits, RowParams.from_params(params))
    for i, sp in enumerate(params):
        x = TemperatureLogitsWarper(sp.temperature)(None, logits[i].clone())
        if sp.top_k:
            x = TopKLogitsWarper(sp.top_k)(None, x)
        x = TopPLogitsWarper(sp.top_p)(None, x)
        torch.testing.assert_close(ours[i], torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


# ---- sampling: the output distribution is the target's ----------------------------------------

VOCAB = 8


def exact_joint(target, prompt, sp: SamplingParams) -> torch.Tensor:
    """P(first two generated tokens) under the warped target: (V, V)."""
    rp = RowParams.from_params([sp])
    first = warp_probs(target(torch.tensor([prompt])).logits[:, -1:], rp)[0, 0]
    seqs = torch.tensor([prompt + [a] for a in range(VOCAB)])
    rp_all = RowParams.from_params([sp] * VOCAB)
    second = warp_probs(target(seqs).logits[:, -1:], rp_all)[:, 0]
    return first.unsqueeze(1) * second


def sampled_joint(engine, prompt, sp: SamplingParams, n: int) -> torch.Tensor:
    requests = [
        GenerationRequest(prompt, 3, SamplingParams(sp.temperature, sp.top_p, sp.top_k, seed=s)) for s in range(n)
    ]
    counts = torch.zeros(VOCAB, VOCAB)
    for r in engine.generate(requests):
        counts[r.token_ids[0], r.token_ids[1]] += 1
    return counts / n


def tv_bound(p: torch.Tensor, n: int) -> float:
    """Three times the expected TV distance of an n-sample empirical distribution from p."""
    expected = 0.5 * torch.sqrt(2 * p * (1 - p) / (torch.pi * n)).sum().item()
    return 3 * expected


@pytest.mark.parametrize("sp", [SamplingParams(1.0), SamplingParams(0.7, 0.9, 5)], ids=["plain", "warped"])
def test_sampling_matches_target_distribution_and_catches_broken_rule(sp, make_engine):
    target = sharpen(tiny_model("llama", seed=0, vocab_size=VOCAB), 6.0)
    drafter = sharpen(tiny_model("llama", seed=5, vocab_size=VOCAB, layers=1), 6.0)
    prompt, n = [3, 5, 4, 6], 4000
    exact = exact_joint(target, prompt, sp)
    bound = tv_bound(exact.flatten(), n)
    good = make_engine(target, drafter, 2, eos_token_ids=())
    tv_good = 0.5 * (sampled_joint(good, prompt, sp, n) - exact).abs().sum().item()
    broken = make_engine(target, drafter, 2, eos_token_ids=(), accept_rule=lambda p, q, u: u < 1.0)
    tv_broken = 0.5 * (sampled_joint(broken, prompt, sp, n) - exact).abs().sum().item()
    assert tv_good < bound, (tv_good, bound)
    assert tv_broken > bound, (tv_broken, bound)  # always accepting = sampling the drafter
    print(f"TV good {tv_good:.4f}, broken {tv_broken:.4f}, bound {bound:.4f}")
