"""prune_model on tiny random models: per-layer sparsity, untouched layers, the sequential
property (block k calibrated on pruned blocks' outputs), target patterns, two architectures."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.models.sparsity import check_masks, check_nm, masked_weights_nonzero, sparsity_problems
from sd2_ray.prune.calibration import render_sample, tokenize_samples
from sd2_ray.prune.config import PruneConfig
from sd2_ray.prune.sequential import decoder_blocks, prune_model
from sd2_ray.prune.sparsegpt import Hessian, sparsegpt_prune
from sd2_ray.testing.calibration import calibration_rows
from sd2_ray.testing.tiny import tiny_model
from sd2_ray.testing.tokenizer import ascii_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batches():
    tok = ascii_tokenizer()
    return tokenize_samples([render_sample(r, tok) for r in calibration_rows(12)], tok, seq_len=96)


def config(**kw):
    base = dict(model="m", calibration="c", output="o", method="sparsegpt", block_size=16)
    return PruneConfig(**{**base, **kw})


def linear_names(model, inside_blocks=True):
    prefix, _ = decoder_blocks(model)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".") == inside_blocks
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_targeted_layers_reach_the_sparsity_and_nothing_else_changes(arch, method, batches):
    model = tiny_model(arch, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, masks, report = prune_model(model, batches, config(method=method, sparsity=0.6))
    targeted = linear_names(model)
    assert sorted(masks) == sorted(f"{n}.weight" for n in targeted)
    check_masks(model, masks)
    assert masked_weights_nonzero(model, masks) == 0
    assert sparsity_problems(model, masks, report) == []
    params = dict(model.named_parameters())
    for name in targeted:
        weight = params[f"{name}.weight"]
        assert int((weight == 0).sum()) == pytest.approx(0.6 * weight.numel(), abs=weight.shape[0] / 2 + 1)
        assert report["layers"][name]["sparsity"] == pytest.approx(0.6, abs=0.5 / weight.shape[1] + 1e-9)
    for key, value in model.state_dict().items():  # embeddings, norms, LM head, biases
        if key not in masks:
            assert torch.equal(value, before[key]), key
    assert report["total_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert report["method"] == method and report["pattern"] == "unstructured"


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_nm_pattern_on_every_targeted_layer(method, batches):
    model = tiny_model("qwen2", layers=2)
    model, masks, report = prune_model(model, batches, config(method=method, pattern="2:4"))
    params = dict(model.named_parameters())
    assert masks and all(check_nm(params[k], 2, 4) for k in masks)
    assert report["total_sparsity"] == pytest.approx(0.5)
    assert sparsity_problems(model, masks, report) == []


def test_block_two_is_calibrated_on_pruned_outputs_of_earlier_blocks(batches):
    """Recompute block 1's q_proj by hand from the pruned block 0's outputs: must match."""
    dense = tiny_model("llama", layers=2, seed=3)
    original_q1 = dense.model.layers[1].self_attn.q_proj.weight.detach().clone()
    pruned, _, _ = prune_model(tiny_model("llama", layers=2, seed=3), batches, config(sparsity=0.5))
    # Inputs of block 1's q_proj when block 0 is pruned and block 1 is still dense:
    probe = tiny_model("llama", layers=2, seed=3)
    probe.model.layers[0].load_state_dict(pruned.model.layers[0].state_dict())
    hessian = Hessian(original_q1.shape[1])
    handle = probe.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: hessian.add(a[0]))
    with torch.no_grad():
        for ids in batches:
            probe(ids, use_cache=False)
    handle.remove()
    expected, _, _ = sparsegpt_prune(original_q1, hessian.matrix(), 0.5, block_size=16)
    torch.testing.assert_close(pruned.model.layers[1].self_attn.q_proj.weight, expected, rtol=1e-4, atol=1e-5)
    # ...and it differs from what calibrating on the dense block 0 would give.
    dense_h = Hessian(original_q1.shape[1])
    handle = dense.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: dense_h.add(a[0]))
    with torch.no_grad():
        for ids in batches:
            dense(ids, use_cache=False)
    handle.remove()
    from_dense, _, _ = sparsegpt_prune(original_q1, dense_h.matrix(), 0.5, block_size=16)
    assert not torch.allclose(from_dense, expected, atol=1e-4)


def test_target_and_ignore_patterns(batches):
    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(method="wanda", targets=["*.layers.*"], ignore=["*.mlp.*", "re:layers\\.1\\.self_attn\\.o_proj"])
    model, masks, _ = prune_model(model, batches, cfg)
    assert masks and not any(".mlp." in k or "layers.1.self_attn.o_proj" in k for k in masks)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, before["model.layers.1.self_attn.o_proj.weight"])


def test_lm_head_can_be_targeted_explicitly(batches):
    model = tiny_model("llama", layers=2)
    model, masks, report = prune_model(model, batches, config(targets=["lm_head"], sparsity=0.5))
    assert list(masks) == ["lm_head.weight"]
    assert report["layers"]["lm_head"]["calibration_tokens"] == sum(b.numel() for b in batches)
    assert (model.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5)


def test_sparsegpt_beats_magnitude_on_model_output(batches):
    """Logit error of the whole pruned model vs the dense one on the calibration text."""
    dense = tiny_model("llama", layers=2, seed=1)
    with torch.no_grad():
        reference = [dense(ids).logits for ids in batches]

    def error(method):
        model, _, _ = prune_model(tiny_model("llama", layers=2, seed=1), batches, config(method=method, sparsity=0.5))
        with torch.no_grad():
            return sum(float((model(ids).logits - r).pow(2).sum()) for ids, r in zip(batches, reference, strict=True))

    assert error("sparsegpt") < error("magnitude")
