"""Distillation core without Ray: requests, filters, result rows, the transformers engine, config."""

from __future__ import annotations

import json

import pytest

from sd2_ray.distill import core
from sd2_ray.distill.config import DistillConfig
from sd2_ray.errors import ConfigError, DataError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_chat_tokenizer():
    """A small byte-level BPE tokenizer with a chat template, trained here (no hub)."""
    from sd2_ray.testing.tokenizer import build_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "write a poem about ray data and drafts"] * 8
    return build_tokenizer(corpus=texts, vocab_size=300, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from sd2_ray.testing.tiny import tiny_model

    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    tok = make_chat_tokenizer()
    tiny_model("llama", seed=3, vocab_size=len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


def test_requests_render_the_chat_template_and_skip_bad_rows(tokenizer):
    rows = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "write a poem"}, {"role": "assistant", "content": "roses"}],
        },
        {"prompt": "the quick brown fox"},
        {"id": "no-prompt", "response": "x"},
        {"id": "wrong-type", "prompt": 5},
        {"id": "bad-messages", "messages": [{"role": "user"}]},
        {"id": "long", "prompt": "the lazy dog " * 40},
        {"id": "bad-response", "prompt": "hi", "response": ["not", "a", "string"]},
        {"id": "bad-category", "prompt": "hi", "category": 3},
        {"id": "a", "prompt": "a second row with id a"},  # the id is the exactly-once key
    ]
    requests, skipped = core.prepare_rows(rows, tokenizer, "generate", max_prompt_tokens=40, shard_size=3)
    assert [r.index for r in requests] == [0, 1] and requests[0].id == "a"
    first = requests[0]
    assert first.prompt_text == "<s><|user|>write a poem\n<|assistant|>"  # trailing answer is the reference
    assert first.reference == "roses" and first.messages == [{"role": "user", "content": "write a poem"}]
    assert first.prompt_ids == tokenizer(first.prompt_text, add_special_tokens=False)["input_ids"]
    assert requests[1].prompt == "the quick brown fox" and requests[1].messages is None
    assert requests[1].id == core.safe_row_id({"prompt": "the quick brown fox"}, 99)  # content id, stable
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert set(reasons) == {"no-prompt", "wrong-type", "bad-messages", "long", "bad-response", "bad-category", "a"}
    assert "neither 'prompt' nor 'messages'" in reasons["no-prompt"]
    assert "max_prompt_tokens=40" in reasons["long"] and reasons["bad-category"] == "'category' must be a string"
    assert skipped[-1] == {"index": 8, "shard": 2, "id": "a", "reason": "duplicate id"}
    assert [s["shard"] for s in skipped] == [0, 1, 1, 1, 2, 2, 2]


def test_rewrite_prompt_holds_instruction_and_reference(tokenizer):
    row = {"id": "r", "prompt": "write a poem", "response": "roses are red"}
    (request,), _ = core.prepare_rows([row], tokenizer, "rewrite", 500, 8)
    assert "write a poem" in request.prompt_text and "roses are red" in request.prompt_text
    assert "own words" in request.prompt_text
    assert request.prompt == "write a poem"  # the drafter learns the original instruction
    _, skipped = core.prepare_rows([{"prompt": "no reference"}], tokenizer, "rewrite", 500, 8)
    assert "needs a reference" in skipped[0]["reason"]


@pytest.mark.parametrize(
    "text,finish,allow,kept",
    [
        ("violets are blue", "stop", False, "target"),
        ("   ", "stop", False, "reference"),
        ("violets are", "length", False, "reference"),
        ("violets are", "length", True, "target"),
        ("As the Reference Answer says, roses", "stop", False, "reference"),
        ("Instruction: write a poem", "stop", False, "reference"),
    ],
)
def test_rewrite_filters_keep_reference_when_rewrite_fails(tokenizer, text, finish, allow, kept):
    (request,), _ = core.prepare_rows([{"prompt": "write a poem", "response": "roses"}], tokenizer, "rewrite", 500, 8)
    row = core.result_row(request, core.Generated(0, text, finish, 3), "rewrite", allow)
    assert row["source"] == kept
    assert row["response"] == (text if kept == "target" else "roses")
    assert (row["rejected"] is None) == (kept == "target")


def test_failed_row_and_table_roundtrip(tokenizer, tmp_path):
    rows = [
        {"id": "a", "prompt": "fox"},
        {"id": "b", "messages": [{"role": "user", "content": "dog"}], "category": "qa"},
    ]
    requests, _ = core.prepare_rows(rows, tokenizer, "generate", 500, 8)
    results = [
        core.result_row(requests[1], core.Generated(1, "woof", "stop", 2), "generate", False),
        core.result_row(requests[0], core.Generated(0, None, None, 0, error="boom"), "generate", False),
    ]
    assert results[1]["response"] is None and results[1]["source"] is None and results[1]["error"] == "boom"
    from sd2_ray import storage

    storage.write_parquet(str(tmp_path / core.shard_file(0)), core.result_table(results))
    assert [r["id"] for r in core.read_distilled(str(tmp_path), include_failed=True)] == ["a", "b"]
    good = core.read_distilled(str(tmp_path))
    assert [(r["id"], r["response"], r["source"], r["category"]) for r in good] == [("b", "woof", "target", "qa")]
    assert good[0]["messages"] == [{"role": "user", "content": "dog"}] and good[0]["prompt_tokens"] > 0
    record = core.shard_record(0, "fp", 3, results, [{"id": "c"}])
    assert (record["rows_in"], record["rows_out"], record["failed"], record["skipped"]) == (3, 1, 1, 1)


def test_batched_greedy_equals_direct_generate(chat_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from sd2_ray.distill.engines import TransformersEngine

    rows = [
        {"prompt": p} for p in ("fox", "the quick brown fox jumps over", "write a poem about data", "lazy dog", "ray")
    ]
    requests, _ = core.prepare_rows(rows, tokenizer, "generate", 500, 8)
    engine = TransformersEngine(chat_model_dir)
    batched = engine.generate([r.prompt_ids for r in requests], max_new_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    assert len({len(r.prompt_ids) for r in requests}) > 1  # the batch really is padded
    for request, (ids, reason) in zip(requests, batched, strict=True):
        direct = model.generate(
            torch.tensor([request.prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(request.prompt_ids) :].tolist()
        expected, expected_reason = core_split(direct, tokenizer.eos_token_id)
        assert ids == expected and reason == expected_reason


def core_split(ids, eos):
    return (ids[: ids.index(eos)], "stop") if eos in ids else (ids, "length")


def test_udf_falls_back_to_rows_when_a_batch_fails(chat_model_dir, tokenizer):
    from sd2_ray.distill.engines import TransformersBatchUDF

    settings = {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": 1,
    }
    udf = TransformersBatchUDF(chat_model_dir, settings)
    good = tokenizer("<s><|user|>fox\n<|assistant|>", add_special_tokens=False)["input_ids"]
    out = udf({"index": [4, 5, 6], "shard": [0, 0, 0], "prompt_ids": [good, [10_000_000], good]})
    assert out["index"] == [4, 5, 6]
    assert out["error"][0] is None and out["error"][2] is None and "Error" in out["error"][1]
    assert out["response"][0] == out["response"][2] and out["response"][1] is None
    assert out["response_tokens"][0] == 5 and out["finish_reason"][0] == "length"


def test_sampling_runs_and_is_seeded(chat_model_dir, tokenizer):
    from sd2_ray.distill.engines import TransformersEngine

    engine = TransformersEngine(chat_model_dir)
    prompt = tokenizer("<s><|user|>fox\n<|assistant|>", add_special_tokens=False)["input_ids"]
    a = engine.generate([prompt, prompt], 10, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate([prompt, prompt], 10, temperature=1.0, top_p=0.9, seed=7)
    assert a == b and all(len(ids) <= 10 for ids, _ in a)


def test_config_flags_and_validation():
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
            "rewrite",
            "--engine",
            "vllm",
            "--actors",
            "3",
            "--batch-size",
            "5",
            "--max-new-tokens",
            "7",
            "--temperature",
            "0.5",
        ]
    )
    config = cli.load_config("distill", args)
    assert (
        config.mode,
        config.engine,
        config.actors,
        config.batch_size,
        config.max_new_tokens,
        config.temperature,
    ) == ("rewrite", "vllm", 3, 5, 7, 0.5)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        DistillConfig.load(overrides={"target": "T", "prompts": "P", "output": "O", "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="mode"):
        DistillConfig.load(overrides={"target": "T", "prompts": "P", "output": "O", "mode": "paraphrase"})
    with pytest.raises(ConfigError, match="actors"):
        DistillConfig.load(overrides={"target": "T", "prompts": "P", "output": "O", "actors": 0})


def test_no_usable_row_is_one_line_naming_the_first_bad_line(chat_model_dir, tmp_path, capsys):
    from sd2_ray import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"{oops\n" + json.dumps({"prompt": ""}).encode() + b"\n\xff\xfe\n")
    code = cli.main(
        ["distill", "--target", chat_model_dir, "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "p.jsonl" in err and "no usable rows (3 skipped; e.g. line 1: invalid JSON" in err
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing started, nothing marked complete
    with pytest.raises(DataError, match="no usable rows"):
        (tmp_path / "empty.jsonl").write_text("\n")
        from sd2_ray.distill.job import main

        main(DistillConfig(target=chat_model_dir, prompts=str(tmp_path / "empty.jsonl"), output=str(tmp_path / "o")))
