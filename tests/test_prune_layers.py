"""Layer-pruned baseline: angular distances vs a brute-force computation, the right block goes,
the smaller model saves, reloads with transformers and generates."""

from __future__ import annotations

import math

import pytest
import torch

from sd2_ray.prune.calibration import render_sample, tokenize_samples
from sd2_ray.prune.layers import angular_distances, drop_blocks, layer_prune
from sd2_ray.testing.calibration import calibration_rows
from sd2_ray.testing.tiny import tiny_model
from sd2_ray.testing.tokenizer import ascii_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batches():
    tok = ascii_tokenizer()
    return tokenize_samples([render_sample(r, tok) for r in calibration_rows(6, seed=4)], tok, seq_len=64)


def brute_force_distances(model, batches, n):
    """Per token, in Python floats: run the blocks one by one by hand and compare h_l, h_{l+n}."""
    layers = model.config.num_hidden_layers
    sums, tokens = [0.0] * (layers - n + 1), 0
    for ids in batches:
        states = []
        hooks = [
            b.register_forward_pre_hook(
                lambda m, a, kw, states=states: states.append((a[0] if a else kw["hidden_states"])[0]), with_kwargs=True
            )
            for b in model.model.layers
        ]
        hooks.append(
            model.model.layers[-1].register_forward_hook(
                lambda m, a, out, states=states: states.append((out[0] if isinstance(out, tuple) else out)[0])
            )
        )
        with torch.no_grad():
            model(ids, use_cache=False)
        for h in hooks:
            h.remove()
        for t in range(ids.shape[1]):
            for start in range(layers - n + 1):
                a, b = states[start][t].tolist(), states[start + n][t].tolist()
                dot = sum(x * y for x, y in zip(a, b, strict=True))
                cos = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
                sums[start] += math.acos(max(-1.0, min(1.0, cos))) / math.pi
        tokens += ids.shape[1]
    return [s / tokens for s in sums]


@pytest.mark.parametrize("n", [1, 2])
def test_angular_distance_matches_brute_force_and_picks_the_minimum(batches, n):
    model = tiny_model("llama", layers=5, seed=2)
    ours = angular_distances(model, batches, n)
    expected = brute_force_distances(model, batches, n)
    assert ours == pytest.approx(expected, abs=1e-6)
    _, report = layer_prune(model, batches, n)
    best = min(range(len(expected)), key=lambda i: expected[i])
    assert report["dropped_blocks"] == list(range(best, best + n))
    assert report["distances"] == {str(i): pytest.approx(d, abs=1e-6) for i, d in enumerate(expected)}


def skip_blocks_forward(model, ids, dropped):
    """Logits of the dense model with some blocks turned into the identity (the reference)."""
    handles = [
        model.model.layers[i].register_forward_hook(
            lambda m, a, out, *_: (a[0],) + tuple(out[1:]) if isinstance(out, tuple) else a[0]
        )
        for i in dropped
    ]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_dropped_model_saves_loads_and_generates(arch, batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, layers=4, seed=5)
    reference = tiny_model(arch, layers=4, seed=5)
    prefix_blocks = model.model.layers if arch != "gpt_neox" else model.gpt_neox.layers
    kept_weights = [b.state_dict() for i, b in enumerate(prefix_blocks) if i not in (1, 2)]
    drop_blocks(model, 1, 2)
    assert model.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    model.save_pretrained(tmp_path / "small")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    blocks = loaded.model.layers if arch != "gpt_neox" else loaded.gpt_neox.layers
    assert len(blocks) == 2
    for block, expected in zip(blocks, kept_weights, strict=True):
        for key, value in block.state_dict().items():
            assert torch.equal(value, expected[key]), key
    ids = batches[0]
    if arch != "gpt_neox":
        torch.testing.assert_close(loaded(ids).logits, skip_blocks_forward(reference, ids, [1, 2]))
    out = loaded.generate(ids[:, :10], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 16
    # Generation with the KV cache equals the uncached greedy continuation (layer_idx renumbered).
    seq = ids[:, :10]
    for _ in range(6):
        with torch.no_grad():
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_drop_layers_out_of_range_is_a_config_error(batches):
    from sd2_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="drop_layers"):
        layer_prune(tiny_model("llama", layers=2), batches, 2)
