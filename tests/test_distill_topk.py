"""The target's top-k per response token (logprobs_top_k) and on-policy rows, without Ray:
engines, scoring, the row contract, config checks. Tiny sharpened models (milliseconds)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sd2_ray.distill import core
from sd2_ray.distill.config import DistillConfig
from sd2_ray.errors import ConfigError

K = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny target/drafter pair; the target's EOS row copies (x1.05) the row of a token its
    greedy continuation of "hello world, this is" produces, so that row stops on EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    from sd2_ray.testing.engine_pairs import tiny_pair_dirs

    target, drafter = tiny_pair_dirs(str(tmp_path_factory.mktemp("pair")))
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[2] = 1.05 * head[59]
    model.save_pretrained(target)
    return target, drafter


@pytest.fixture(scope="module")
def target(pair):
    import torch

    from sd2_ray.distill.engines import TransformersEngine

    torch.set_num_threads(1)
    return TransformersEngine(pair[0], torch_threads=1)


def prompts_of(engine, texts=("the cat", "a quick fox jumps", "hello world, this is", "x")):
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def direct_topk(model, prompt, response, k):
    """Top-k of the target's temperature-1 distribution at each response token: one unpadded
    forward, independent of the engine and of scoring.py."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    top = torch.log_softmax(logits.float(), -1).topk(k, -1)
    return top.indices.numpy(), top.values.numpy()


def test_greedy_generation_stores_the_raw_top_k_aligned_with_the_ids(target):
    prompts = prompts_of(target)
    outputs = target.generate_scored(prompts, 12, top_k=K)
    assert [(o.kept, o.reason) for o in outputs] == target.generate(prompts, 12)
    assert {o.reason for o in outputs} == {"stop", "length"}, "want both an EOS stop and a length cut"
    for prompt, out in zip(prompts, outputs, strict=True):
        ids, values = out.topk
        assert ids.dtype == np.int32 and values.dtype == np.float32
        assert ids.shape == values.shape == (len(out.response_ids), K)
        if out.reason == "stop":
            assert out.response_ids == out.kept + [target.eos_ids[0]]  # the EOS is stored, with its top-k
        else:
            assert out.response_ids == out.kept
        assert list(ids[:, 0]) == out.response_ids  # greedy: the stored top-1 is the token produced
        assert bool((np.diff(values, axis=1) <= 0).all())  # most likely first
        want_ids, want_values = direct_topk(target.model, prompt, out.response_ids, K)
        assert (ids == want_ids).all() and np.allclose(values, want_values, atol=1e-4)


def test_sampled_generation_stores_the_temperature_1_distribution(target):
    """With temperature 0.5 / top_p 0.8 the tokens are sampled from the warped distribution, but
    what is stored is the model's own, unwarped one."""
    prompts = prompts_of(target)
    outputs = target.generate_scored(prompts, 10, temperature=0.5, top_p=0.8, seed=3, top_k=K)
    for prompt, out in zip(prompts, outputs, strict=True):
        want_ids, want_values = direct_topk(target.model, prompt, out.response_ids, K)
        assert (out.topk[0] == want_ids).all() and np.allclose(out.topk[1], want_values, atol=1e-4)
    assert any(np.exp(out.topk[1][:, 0]).min() < 0.99 for out in outputs)  # not a one-hot warp


def test_scoring_a_given_continuation_matches_the_direct_forward(target):
    from sd2_ray.distill.scoring import score_continuations

    prompts = prompts_of(target)
    continuations = [[5, 6, 7], [9], [], [11, 12, 13, 14, 15]]
    scored = score_continuations(target.model, prompts, continuations, K, target.pad_id)
    for prompt, cont, (ids, values) in zip(prompts, continuations, scored, strict=True):
        assert ids.shape == (len(cont), K)
        if cont:
            want_ids, want_values = direct_topk(target.model, prompt, cont, K)
            assert (ids == want_ids).all() and np.allclose(values, want_values, atol=1e-4)


def test_udf_rows_and_the_parquet_row_contract(pair, tmp_path):
    import pyarrow.parquet as pq

    from sd2_ray import storage
    from sd2_ray.distill.engines import TransformersBatchUDF, to_generated

    settings = {
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": 1,
        "logprobs_top_k": K,
    }
    udf = TransformersBatchUDF(pair[0], settings)
    rows = [{"id": "a", "prompt": "the cat"}, {"id": "b", "prompt": "hello world", "response": "hi"}]
    requests, _ = core.prepare_rows(rows, udf.engine.tokenizer, "generate", 500, 8)
    out = udf({"index": [0, 1], "shard": [0, 0], "prompt_ids": [r.prompt_ids for r in requests]})
    assert [len(x) for x in out["topk_ids"]] == [len(x) for x in out["response_ids"]]
    generated = [to_generated({k: v[i] for k, v in out.items()}, udf.engine.eos_ids, 8, K) for i in range(2)]
    results = [
        core.result_row(requests[0], generated[0], "generate", False),
        core.result_row(requests[1], core.Generated(1, None, None, 0, error="boom"), "generate", False),
    ]
    path = str(tmp_path / core.shard_file(0))
    storage.write_parquet(path, core.result_table(results, K))
    import pyarrow as pa

    schema = pq.read_schema(path)
    assert schema.field("response_ids").type.value_type == pa.int32()
    assert schema.field("topk_ids").type.value_type.value_type == pa.int32()  # list<list<int32>>
    assert schema.field("topk_logprobs").type.value_type.value_type == pa.float32()
    back = core.read_distilled(str(tmp_path), include_failed=True)
    assert back[0]["response_ids"] == out["response_ids"][0]
    assert back[0]["topk_ids"] == out["topk_ids"][0].to_pylist()
    assert np.allclose(back[0]["topk_logprobs"], out["topk_logprobs"][0].to_pylist())
    assert back[1]["response_ids"] is None and back[1]["topk_ids"] is None
    assert "topk_ids" not in core.output_schema(0).names and "response_ids" in core.output_schema(0).names


def test_a_rewrite_that_keeps_the_reference_drops_the_token_columns(target):
    (request,), _ = core.prepare_rows([{"prompt": "the cat", "response": "a dog"}], target.tokenizer, "rewrite", 500, 8)
    ids, values = np.zeros((2, K), np.int32), np.zeros((2, K), np.float32)
    generated = core.Generated(
        0, "reference answer says", "stop", 1, token_ids=[5, 2], topk_ids=ids, topk_logprobs=values
    )
    row = core.result_row(request, generated, "rewrite", False)
    assert row["source"] == "reference" and row["response_ids"] is None and row["topk_ids"] is None


def test_vllm_logprob_dicts_become_the_sorted_top_k():
    from sd2_ray.distill.scoring import vllm_topk

    info = lambda lp, rank: {"logprob": lp, "rank": rank, "decoded_token": "x"}  # noqa: E731
    positions = [
        {"7": info(-3.0, 5), 3: info(-0.1, 1), 4: info(-2.0, 2), 9: info(-2.5, 3)},  # sampled 7 outside top-3
        {1: info(-0.5, 1), 2: info(-1.5, 2), 8: info(-1.0, 3), 5: None},  # a union key absent here
    ]
    ids, values = vllm_topk(positions, 3, 2)
    assert ids.tolist() == [[3, 4, 9], [1, 8, 2]]
    assert np.allclose(values, [[-0.1, -2.0, -2.5], [-0.5, -1.0, -1.5]])
    with pytest.raises(ValueError, match="fewer than k"):
        vllm_topk(positions, 5, 2)


def test_on_policy_udf_scores_the_drafters_continuation_with_the_target(pair):
    from sd2_ray.distill.engines import TransformersEngine
    from sd2_ray.distill.onpolicy import OnPolicyBatchUDF

    settings = {
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": 1,
        "logprobs_top_k": K,
    }
    udf = OnPolicyBatchUDF(pair[0], pair[1], settings)
    prompts = prompts_of(udf.engine)
    out = udf({"index": [0, 1, 2, 3], "shard": [0] * 4, "prompt_ids": prompts})
    drafter = TransformersEngine(pair[1])
    assert [o.response_ids for o in drafter.generate_scored(prompts, 8)] == out["response_ids"]
    assert out["response_ids"] != [o.response_ids for o in udf.engine.generate_scored(prompts, 8)]
    for prompt, ids, topk, values in zip(
        prompts, out["response_ids"], out["topk_ids"], out["topk_logprobs"], strict=True
    ):
        want_ids, want_values = direct_topk(udf.engine.model, prompt, ids, K)  # the *target's* scores
        assert (np.array(topk.to_pylist()) == want_ids).all()
        assert np.allclose(values.to_pylist(), want_values, atol=1e-4)
    request = core.Request(0, 0, "a", None, "the cat", None, "the cat", prompts[0])
    row = core.result_row(request, core.Generated(0, "x", "stop", 1), "on-policy", False)
    assert row["source"] == "drafter"


def test_config_checks_and_the_fingerprint_holds_the_new_settings():
    from sd2_ray.distill.job import shard_settings

    base = {"target": "T", "prompts": "P", "output": "O"}
    with pytest.raises(ConfigError, match="on-policy needs engine transformers"):
        DistillConfig.load(
            overrides={**base, "mode": "on-policy", "engine": "vllm", "drafter": "D", "logprobs_top_k": 4}
        )
    with pytest.raises(ConfigError, match="needs a drafter"):
        DistillConfig.load(overrides={**base, "mode": "on-policy", "logprobs_top_k": 4})
    with pytest.raises(ConfigError, match="logprobs_top_k"):
        DistillConfig.load(overrides={**base, "mode": "on-policy", "drafter": "D"})
    with pytest.raises(ConfigError, match="only used by mode on-policy"):
        DistillConfig.load(overrides={**base, "drafter": "D"})
    with pytest.raises(ConfigError, match="logprobs_top_k"):
        DistillConfig.load(overrides={**base, "logprobs_top_k": -1})
    off, on = DistillConfig(**base), DistillConfig(**base, logprobs_top_k=20)
    fp = lambda c: core.fingerprint(["a"], shard_settings(c, 100))  # noqa: E731
    assert fp(off) != fp(on) != fp(DistillConfig(**base, logprobs_top_k=5))
    on_policy = DistillConfig(**base, mode="on-policy", drafter="D", logprobs_top_k=20)
    assert fp(on_policy) != fp(on_policy.model_copy(update={"drafter": "D2"}))


def test_cli_takes_mode_on_policy_and_drafter():
    from sd2_ray import cli

    args = cli.build_parser().parse_args(
        [
            "distill",
            "--target",
            "T",
            "--prompts",
            "P",
            "--output",
            "O",
            "--mode",
            "on-policy",
            "--drafter",
            "D",
            "--logprobs-top-k",
            "20",
        ]
    )
    config = cli.load_config("distill", args)
    assert (config.mode, config.drafter, config.logprobs_top_k) == ("on-policy", os.path.abspath("D"), 20)
