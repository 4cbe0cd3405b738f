"""The static KV cache (slot == position, rollback by length) and the compiled decode steps.

The cache tests compare logits with a plain forward over the same tokens; the compiled tests
(slow: torch.compile builds C++ kernels, minutes on a shared 2-core box) show that compiled
and eager decoding give the same tokens, greedy and seeded sampling alike."""

from __future__ import annotations

import copy

import pytest
import torch

from sd2_ray.specdec.engine import SpeculativeEngine
from sd2_ray.specdec.kv import right_aligned
from sd2_ray.specdec.sampling import RowParams
from sd2_ray.specdec.static_kv import StaticKV, supports_static
from sd2_ray.specdec.steps import DecodeSteps
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.testing.engine_pairs import sharpen
from sd2_ray.testing.tiny import tiny_model


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only (a module-level switch would leak into later test files)."""
    with torch.no_grad():
        yield


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("gpt_neox", "sdpa")])
def test_rollback_by_length_keeps_logits_exact(arch, attn):
    model = tiny_model(arch, seed=3)
    model.config._attn_implementation = attn
    assert supports_static(model)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (7, 3)]
    kv = StaticKV(model, 2, capacity=32)
    tokens, real = right_aligned(rows)  # row 1 starts with 4 padding columns
    out = kv.forward(tokens, real, logits_to_keep=1)[:, -1]
    assert not out.isnan().any()
    for i, ids in enumerate(rows):
        torch.testing.assert_close(out[i], last_logits(model, ids), atol=1e-5, rtol=1e-4)
    drafts = torch.randint(3, 96, (2, 3), generator=g)
    kv.forward(drafts, torch.ones(2, 3, dtype=torch.bool))
    kv.drop_last(torch.tensor([2, 0]))  # row 0 keeps one draft, row 1 all three
    assert kv.lengths.tolist() == [8, 6] and kv.bound == 8
    rows = [rows[0] + drafts[0, :1].tolist(), rows[1] + drafts[1].tolist()]
    nxt = [[11, 12], [13]]  # a ragged chunk again: the stale slots of row 0 are overwritten
    out = kv.forward(*right_aligned(nxt), logits_to_keep=1)[:, -1]
    for i, ids in enumerate(rows):
        torch.testing.assert_close(out[i], last_logits(model, ids + nxt[i]), atol=1e-5, rtol=1e-4)
    kv.select(torch.tensor([1]))
    out = kv.forward(torch.tensor([[14]]), torch.ones(1, 1, dtype=torch.bool), logits_to_keep=1)[:, -1]
    torch.testing.assert_close(out[0], last_logits(model, rows[1] + nxt[1] + [14]), atol=1e-5, rtol=1e-4)


def test_overflow_is_an_error_not_a_wrong_answer():
    model = tiny_model("llama")
    kv = StaticKV(model, 1, capacity=4)
    kv.forward(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="overflow"):
        kv.forward(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool))


def test_draft_chain_equals_step_by_step_greedy():
    model = sharpen(tiny_model("llama", seed=1), 4.0)
    prompt = [5, 9, 14, 3]
    kv = StaticKV(model, 1, capacity=16)
    rp = RowParams.from_params([SamplingParams()])
    drafts, probs = DecodeSteps(model).draft(
        kv, torch.tensor([prompt]), torch.ones(1, 4, dtype=torch.bool), 3, rp, torch.zeros(1, 3), vocab=96
    )
    ids = list(prompt)
    for _ in range(3):
        ids.append(int(last_logits(model, ids).argmax()))
    assert drafts[0].tolist() == ids[4:] and probs is None
    assert kv.lengths.tolist() == [6]  # the last draft is not fed


def test_models_without_4d_masks_use_the_growing_cache():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_static(model)
    engine = SpeculativeEngine(model, None, 0, compile=True)
    assert not engine.static_cache and not engine.compile


def noisy_pair():
    target = sharpen(tiny_model("llama", seed=0), 4.0)
    torch.manual_seed(7)
    drafter = copy.deepcopy(target)
    for p in drafter.parameters():
        p.add_(torch.randn_like(p) * 0.6 * p.std())
    return target, drafter.eval()


@pytest.mark.slow
def test_compiled_steps_give_the_eager_tokens():
    """Budgets differ per row (rows leave the batch, the last pass drafts past short budgets),
    greedy and seeded sampling: compiled == static eager == growing-cache eager."""
    target, drafter = noisy_pair()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 11, 2)]
    budgets = [30, 17, 9]
    engines = [
        SpeculativeEngine(target, drafter, 3, eos_token_ids=(), compile=True),
        SpeculativeEngine(target, drafter, 3, eos_token_ids=()),
        SpeculativeEngine(target, drafter, 3, eos_token_ids=(), static_cache=False),
    ]
    assert engines[0].compile
    for sp in (SamplingParams(), SamplingParams(temperature=0.9, top_k=20, seed=3)):
        requests = [GenerationRequest(p, n, sp) for p, n in zip(prompts, budgets, strict=True)]
        outputs = [[r.token_ids for r in e.generate(requests)] for e in engines]
        assert outputs[0] == outputs[1] == outputs[2]
        assert [len(o) for o in outputs[0]] == budgets
    alone = SpeculativeEngine(target, None, 0, eos_token_ids=(), compile=True)
    requests = [GenerationRequest(p, n) for p, n in zip(prompts, budgets, strict=True)]
    greedy = [r.token_ids for r in engines[1].generate(requests)]
    assert [r.token_ids for r in alone.generate(requests)] == greedy


@pytest.mark.slow
def test_compiled_verification_serves_a_cross_tokenizer_pair():
    """The cross-tokenizer drafter stays eager on its growing cache; the target's verification
    runs compiled with its fixed K+1 chunk although rows propose fewer drafts."""
    from sd2_ray.testing.tokenizer import bpe_tokenizer, char_tokenizer

    t_tok, d_tok = char_tokenizer(), bpe_tokenizer()
    target = sharpen(tiny_model("llama", seed=0, vocab_size=len(t_tok)), 4.0)
    drafter = sharpen(tiny_model("qwen2", seed=1, vocab_size=len(d_tok)), 4.0)
    prompts = [t_tok.encode(t) for t in ("hello there", "the cat sat on the")]
    compiled = SpeculativeEngine(target, drafter, 3, t_tok, d_tok, compile=True)
    assert compiled.cross_tokenizer and compiled.compile
    for sp in (SamplingParams(), SamplingParams(temperature=0.8, seed=5)):
        requests = [GenerationRequest(p, 16, sp) for p in prompts]
        eager = SpeculativeEngine(target, drafter, 3, t_tok, d_tok).generate(requests)
        assert [r.token_ids for r in compiled.generate(requests)] == [r.token_ids for r in eager]


def test_engine_import_leaves_transformers_lazy():
    import subprocess
    import sys

    code = "import sys, sd2_ray.specdec.engine, sd2_ray.specdec.steps; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
