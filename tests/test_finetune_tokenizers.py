"""A drafter fine-tuned on distilled rows learns the answer in its own tokenizer.

Distillation stores the target's token ids (``response_ids``); they mean something to a drafter
only when it shares the target's vocabulary. These tests distil with one small tokenizer (Ray's
engine replaced by a stand-in that answers with the target tokenizer's ids, so no Ray starts)
and fine-tune a drafter with another, larger one, then check the token ids the workers would
train on: the fine-tune's Ray Train call is replaced by one that encodes the staged rows exactly
as a worker does and stops.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from sd2_ray import storage
from sd2_ray.errors import ConfigError
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.testing.tokenizer import TOY_CHARS, TOY_CHAT_TEMPLATE, UNK, build_tokenizer, toy_tokenizer
from sd2_ray.testing.toy import toy_rows

K = 3


class Stopped(Exception):
    """Raised by the stand-in trainer once it has the workers' batches."""


def other_tokenizer():
    """Another family's tokenizer: a larger vocabulary, the same characters under other ids."""
    extras = [f"<extra{i}>" for i in range(10)]  # ids no text encodes to: they only shift the characters'
    return build_tokenizer(extras + list(reversed(TOY_CHARS)), unk_token=UNK, chat_template=TOY_CHAT_TEMPLATE)


def model_dir(path, tokenizer) -> str:
    from sd2_ray.testing.tiny import tiny_model

    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fake_generate(answers: dict[str, str], tokenizer, top_k: int):
    """Ray Data's engine replaced: each request answered with ``answers[id]`` in the target's ids."""
    from sd2_ray.distill.core import Generated

    def generate(requests, model_dir, config, eos_ids, on_shard, progress=None, context=None, vision=False):
        by_shard: dict[int, list] = {}
        for req in requests:
            text = answers[req.id]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            topk = [[t] + [(t + j) % len(tokenizer) for j in range(1, top_k)] for t in ids] if top_k else None
            logprobs = [[-0.1] + [-3.0] * (top_k - 1) for _ in ids] if top_k else None
            gen = Generated(req.index, text, "stop", len(ids) - 1, token_ids=ids, topk_ids=topk, topk_logprobs=logprobs)
            by_shard.setdefault(req.shard, []).append((req, gen))
        for shard, answered in by_shard.items():
            on_shard(shard, answered)

    return generate


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(root, target dir, distilled dir, answers): ``sd2 distill`` output of a char-tokenizer target,
    written with the target's top-k."""
    from sd2_ray.distill import job, ray_data
    from sd2_ray.distill.config import DistillConfig

    root = tmp_path_factory.mktemp("xtok")
    target_tok = toy_tokenizer()
    target = model_dir(root / "target", target_tok)
    rows = toy_rows(12, seed=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({k: r[k] for k in ("id", "messages")}) + "\n" for r in rows))
    answers = {r["id"]: r["response"] for r in rows}
    mp = pytest.MonkeyPatch()
    mp.setattr(ray_data, "generate_shards", fake_generate(answers, target_tok, K))
    try:
        job.main(
            DistillConfig(
                target=target, prompts=str(prompts), output=str(root / "distilled"), logprobs_top_k=K, shard_size=6
            )
        )
    finally:
        mp.undo()
    return str(root), target, str(root / "distilled"), answers


def trained_labels(monkeypatch, config: FinetuneConfig) -> list[tuple[str, list[int]]]:
    """(row id, the answer's token ids) as the fine-tune's workers would train on them."""
    from sd2_ray.finetune import ray_train, step
    from sd2_ray.finetune.data import IGNORE_INDEX
    from sd2_ray.models.io import load_tokenizer

    seen = []

    def fit(config, worker, files, callbacks):
        rows = [r for f in files for r in storage.read_parquet(f).to_pylist()]
        tokenizer = load_tokenizer(worker.model)
        for row in rows:
            (batch,) = step.encode_batches([row], tokenizer, worker, 1)
            seen.append((row["id"], [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]))
        raise Stopped

    monkeypatch.setattr(ray_train, "fit", fit)
    from sd2_ray.finetune.job import run_finetune

    with pytest.raises(Stopped):
        run_finetune(config)
    return seen


def finetune_config(model: str, data: str, out: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(model=model, data=data, output=out, workers=1, batch_size=4, **kw)


def test_a_same_tokenizer_drafter_trains_on_the_targets_own_ids(distilled, monkeypatch, tmp_path):
    root, target, data, answers = distilled
    tok = toy_tokenizer()
    drafter = model_dir(tmp_path / "same", tok)
    seen = trained_labels(monkeypatch, finetune_config(drafter, data, str(tmp_path / "out")))
    stored = {
        r["id"]: list(r["response_ids"])
        for r in storage.read_parquet(os.path.join(data, "shard-00000.parquet")).to_pylist()
    }
    assert seen and all(labels == stored[rid] for rid, labels in seen if rid in stored)


def test_another_tokenizers_drafter_learns_the_text_in_its_own_ids(distilled, monkeypatch, tmp_path):
    """The default fine-tune of a cross-family drafter used to train on the target's ids, which
    decode to nonsense in the drafter's vocabulary."""
    root, target, data, answers = distilled
    tok = other_tokenizer()
    drafter = model_dir(tmp_path / "other", tok)
    seen = trained_labels(monkeypatch, finetune_config(drafter, data, str(tmp_path / "out")))
    assert len(seen) == len(answers)
    for rid, labels in seen:
        own = tok(answers[rid], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels == own, (rid, tok.decode(labels), answers[rid])


def test_the_targets_ids_or_top_k_for_another_tokenizer_are_refused_in_one_line(
    distilled, monkeypatch, tmp_path, capsys
):
    from sd2_ray.cli import main
    from sd2_ray.finetune import ray_train

    def fit(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(ray_train, "fit", fit)

    root, target, data, answers = distilled
    drafter = model_dir(tmp_path / "other", other_tokenizer())
    out = str(tmp_path / "out")
    capsys.readouterr()  # the model save's progress bar
    base = ["finetune", "--model", drafter, "--data", data, "--output", out, "workers=1", "batch_size=4"]
    for argv, field in (
        (["use_response_ids=true"], "field 'use_response_ids'"),
        (["--loss", "fkl"], "field 'loss'"),
        (["select_by=expected_mal", "eval_every=2", "eval_rows=2"], "field 'select_by'"),
    ):
        code = main(base + argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and field in err and "tokenizer" in err and "\n" not in err, (argv, err)
    assert not storage.exists(out)  # refused before anything was written


def test_rows_without_a_recorded_tokenizer_are_checked_against_their_text(distilled, monkeypatch, tmp_path):
    """Hand-made or older distilled files (no manifest naming the tokenizer): the ids are used only
    when the drafter decodes them back to the stored response."""
    root, target, data, answers = distilled
    bare = tmp_path / "bare"
    rows = storage.read_parquet(os.path.join(data, "shard-00000.parquet")).to_pylist()
    storage.write_parquet(str(bare / "part-0.parquet"), pa.Table.from_pylist(rows))
    tok = other_tokenizer()
    drafter = model_dir(tmp_path / "other", tok)
    seen = trained_labels(monkeypatch, finetune_config(drafter, str(bare), str(tmp_path / "out")))
    for rid, labels in seen:
        assert labels == tok(answers[rid], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(ConfigError, match="field 'use_response_ids'"):
        trained_labels(monkeypatch, finetune_config(drafter, str(bare), str(tmp_path / "out2"), use_response_ids=True))


def test_the_distill_manifest_names_the_targets_tokenizer(distilled):
    from sd2_ray import manifest

    root, target, data, answers = distilled
    recorded = manifest.read(data)["tokenizer"]
    assert recorded["vocab_size"] == len(toy_tokenizer()) and len(recorded["fingerprint"]) == 64


def test_the_cross_family_config_trains_on_the_drafters_own_tokens():
    from sd2_ray.pipeline.config import PipelineConfig

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = PipelineConfig.load(os.path.join(here, "jobs/configs/llama70b_to_qwen_uag.yaml"))
    assert config.finetune.use_response_ids is False


def test_the_kits_own_family_keeps_the_targets_ids_and_its_cross_family_drafter_does_not(kit_dir, tmp_path):
    """The fingerprint tells the kit's same-family drafter (trains on the target's ids, as SD²
    does) from its UAG drafter (another tokenizer: re-tokenised text)."""
    from sd2_ray import manifest
    from sd2_ray.finetune.provenance import judge
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.models.tokens import tokenizer_identity

    tok = {part: load_tokenizer(os.path.join(kit_dir, part)) for part in ("target", "drafter", "drafter-uag")}
    data = str(tmp_path / "distilled")
    manifest.complete(data, "distill", tokenizer=tokenizer_identity(tok["target"], "kit:target"))
    rows = [{"response_ids": [5, 6, 7], "response": "unused"}]
    assert judge(data, rows, tok["drafter"]).same is True
    assert judge(data, rows, tok["drafter-uag"]).same is False
