"""Cross-tokenizer pairs (UAG): lossless greedy and sampling, translation pieces."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.specdec.engine import SpeculativeEngine
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.specdec.uag import Translator, common_prefix, needs_translation
from sd2_ray.testing.engine_pairs import hf_greedy, noisy_copy, permuted_copy, sharpen
from sd2_ray.testing.tiny import tiny_model
from sd2_ray.testing.tokenizer import bpe_tokenizer, char_tokenizer


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only; a module-level set_grad_enabled(False) would leak into every later test file
    of the same process (fine-tuning tests then train nothing)."""
    with torch.no_grad():
        yield


TEXTS = ["hello there", "the cat sat on the", "x", "An answer: 42"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toks():
    return char_tokenizer(), char_tokenizer(seed=3), bpe_tokenizer()


@pytest.fixture(scope="module")
def target(toks):
    return sharpen(tiny_model("llama", seed=0, vocab_size=len(toks[0])), 4.0)


def test_translation_is_chosen_only_when_vocabularies_differ(toks, target):
    t_tok, p_tok, b_tok = toks
    assert not needs_translation(t_tok, char_tokenizer()) and not needs_translation(None, b_tok)
    assert needs_translation(t_tok, p_tok) and needs_translation(t_tok, b_tok)
    assert not SpeculativeEngine(target, target, 2, t_tok, char_tokenizer()).cross_tokenizer
    drafter = tiny_model("qwen2", seed=1, vocab_size=len(b_tok))
    assert SpeculativeEngine(target, drafter, 2, t_tok, b_tok).cross_tokenizer


def test_translator_pieces(toks):
    t_tok, _, b_tok = toks
    tr = Translator(t_tok, b_tok, len(t_tok))
    history = t_tok.encode("say the")
    ids = tr.target_candidates(history, " theory", 10)
    assert t_tok.decode(history + ids) == "say the theory"
    context = b_tok.encode("x the")
    drafted = b_tok.encode(" thin")
    assert tr.draft_text(context, drafted) == " thin"
    # shared tokens map to the target id with the same text; merges exist only in the drafter
    th = b_tok.convert_tokens_to_ids("th")
    a = b_tok.convert_tokens_to_ids("a")
    assert tr.drafter_to_target[th] == -1 and tr.drafter_to_target[a] == t_tok.convert_tokens_to_ids("a")
    assert tr.drafter_to_target[b_tok.eos_token_id] == t_tok.eos_token_id
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    prompt = t_tok.encode("hi")
    assert tr.drafter_context(prompt, t_tok.encode(" there")) == b_tok.encode("hi") + b_tok.encode(" there")


@pytest.mark.parametrize("k", [2, 4])
def test_same_function_drafter_with_other_vocabulary_accepts_everything(toks, target, k):
    """A drafter computing the target's exact function under permuted ids: a correct bridge
    accepts every draft (greedy: MAL = K+1; sampling: acceptance 1)."""
    t_tok, p_tok, _ = toks
    drafter = permuted_copy(target, t_tok, p_tok)
    prompts = [t_tok.encode(s) for s in TEXTS[:3]]
    engine = SpeculativeEngine(target, drafter, k, t_tok, p_tok, eos_token_ids=())
    results = engine.generate([GenerationRequest(p, 3 * (k + 1)) for p in prompts])
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 3 * (k + 1), eos=None) for p in prompts]
    assert all(r.stats.mean_accepted_length == k + 1 for r in results)
    sampled = engine.generate(
        [GenerationRequest(p, 3 * (k + 1), SamplingParams(1.0, seed=i)) for i, p in enumerate(prompts)]
    )
    assert all(r.stats.acceptance_rate == 1.0 for r in sampled)


@pytest.mark.parametrize("batch,k", [(1, 3), (4, 4)])
def test_cross_tokenizer_greedy_is_lossless(toks, target, batch, k):
    t_tok, _, b_tok = toks
    drafter = sharpen(tiny_model("qwen2", seed=1, vocab_size=len(b_tok), layers=1), 4.0)
    prompts = [t_tok.encode(s) for s in TEXTS[:batch]]
    engine = SpeculativeEngine(target, drafter, k, t_tok, b_tok)
    results = engine.generate([GenerationRequest(p, 20) for p in prompts])
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 20) for p in prompts]
    assert all(1.0 <= r.stats.mean_accepted_length <= k + 1 for r in results)


def test_cross_tokenizer_noisy_drafter_accepts_some_and_stays_lossless(toks, target):
    """Partial agreement through the text bridge: 1 < MAL < K+1, output still the target's."""
    t_tok, p_tok, _ = toks
    drafter = noisy_copy(permuted_copy(target, t_tok, p_tok), 0.5, seed=0)
    prompts = [t_tok.encode(s) for s in TEXTS]
    engine = SpeculativeEngine(target, drafter, 3, t_tok, p_tok, eos_token_ids=())
    results = engine.generate([GenerationRequest(p, 24) for p in prompts])
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 24, eos=None) for p in prompts]
    total = sum(r.stats.committed_tokens for r in results) / sum(r.stats.target_passes for r in results)
    assert 1.0 < total < 4.0


def test_cross_tokenizer_sampling_follows_target(toks, target):
    """Intersection sampling with a drafter whose vocabulary only partly overlaps: the first two
    generated tokens' marginals match the target's exact distributions."""
    t_tok, _, b_tok = toks
    drafter = sharpen(tiny_model("qwen2", seed=1, vocab_size=len(b_tok), layers=1), 4.0)
    prompt, n = t_tok.encode("the"), 2500
    engine = SpeculativeEngine(target, drafter, 2, t_tok, b_tok, eos_token_ids=())
    results = engine.generate([GenerationRequest(prompt, 2, SamplingParams(1.0, seed=s)) for s in range(n)])
    first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
    seconds = torch.softmax(target(torch.tensor([prompt + [a] for a in range(len(first))])).logits[:, -1], -1)
    counts = torch.zeros(2, len(first))
    for r in results:
        counts[0, r.token_ids[0]] += 1
        counts[1, r.token_ids[1]] += 1
    for empirical, exact in ((counts[0] / n, first), (counts[1] / n, first @ seconds)):
        bound = 3 * 0.5 * torch.sqrt(2 * exact * (1 - exact) / (torch.pi * n)).sum().item()
        assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert sum(r.stats.num_accepted_tokens for r in results) > 0
