"""MAC accounting: hand counts on tiny models, sparsity lowers it by exactly the zeros."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.models.macs import cost_coefficient, linear_macs, macs_at_context, predicted_speedup
from sd2_ray.testing.tiny import tiny_model


def test_llama_hand_count():
    # hidden 32, 4 heads of 8, 2 kv heads (k/v: 16 wide), mlp 64, vocab 96, 2 layers, untied head
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
    head = 32 * 96
    report = linear_macs(tiny_model("llama"))
    assert report["dense_macs"] == report["macs"] == 2 * per_layer + head
    assert report["head_macs"] == head and report["blocks_macs"] == 2 * per_layer
    assert report["attention_macs_per_context_token"] == 2 * 2 * 4 * 8
    assert macs_at_context(report, 10) == report["macs"] + 10 * 128
    assert "model.embed_tokens" not in report["layers"]


def test_gpt2_conv1d_and_tied_head_counted_once():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    per_layer = 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16  # c_attn, c_proj, c_fc, mlp c_proj
    report = linear_macs(model)
    assert report["dense_macs"] == 2 * per_layer + 16 * 50  # the tied head counts once, as a linear


def test_zeroing_half_a_layer_lowers_macs_by_exactly_that():
    model = tiny_model("qwen2")
    before = linear_macs(model)
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight[: weight.shape[0] // 2] = 0
    after = linear_macs(model)
    assert before["macs"] - after["macs"] == weight.numel() // 2
    assert after["dense_macs"] == before["dense_macs"]
    assert after["sparsity"] == pytest.approx((weight.numel() // 2) / before["dense_macs"])


def test_cost_coefficient_and_predicted_speedup():
    target, drafter = tiny_model("llama"), tiny_model("llama", layers=1)
    c = cost_coefficient(drafter, target)
    expected = (linear_macs(drafter)["macs"]) / linear_macs(target)["macs"]
    assert c == expected and 0 < c < 1
    assert cost_coefficient(linear_macs(drafter), linear_macs(target)) == c
    assert predicted_speedup(3.0, 4, 0.25) == 1.5
