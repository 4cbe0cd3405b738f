"""`sd2 finetune` with a `feature_head` section on a real local Ray: the kit target's features
stream from an actor pool into 2 DeepSpeed workers (split, never written), the head's loss falls,
held-out chain acceptance selects the published step, and the published head drafts losslessly
with a MAL above 1 on prompts it never saw."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sd2_ray import manifest
from sd2_ray.feature.decode import FeatureSpecDecoder, total_stats
from sd2_ray.feature.head import FeatureHead, is_feature_head
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.job import run_finetune
from sd2_ray.specdec.types import GenerationRequest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    from sd2_ray.finetune.extensions import extensions_dir
    from sd2_ray.runtime import ensure_ray

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    # 2 training workers, 1 feature actor, and room for Ray Data's read tasks (logical CPUs)
    ensure_ray(num_cpus=5, attempts=3)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def kit_files(kit_dir):
    from sd2_ray.kit import kit_paths

    paths = kit_paths(kit_dir)
    return os.path.join(kit_dir, "target"), paths["train_prompts"], paths["eval_prompts"]


def test_feature_head_finetune_streams_features_and_drafts_losslessly(kit_files, tmp_path):
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import read_rows, render_prompt

    target_dir, train, heldout = kit_files
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(train)[:104]))
    config = FinetuneConfig(
        model=target_dir,
        data=str(data),
        output=str(tmp_path / "head"),
        workers=2,
        batch_size=8,
        max_steps=12,
        lr=3e-3,
        warmup_steps=1,
        seq_len=96,
        checkpoint_every=6,
        eval_every=4,
        eval_rows=8,
        select_by="expected_mal",
        feature_head={"variant": "fspad", "stream": {"batch_size": 4}},
    )
    result = run_finetune(config)
    out = config.output
    assert manifest.is_complete(out) and is_feature_head(out)
    assert not os.path.exists(os.path.join(out, "_data")) and not os.path.exists(os.path.join(out, "_checkpoints"))
    history = result.history
    assert history[-1]["loss"] < history[0]["loss"]
    evals = [h["expected_mal"] for h in history if "expected_mal" in h]
    assert len(evals) == 3 and all(1.0 <= v <= 5.0 for v in evals)
    selection = result.summary["selection"]
    assert selection["select_by"] == "expected_mal" and selection["value"] == max(evals)

    target, tokenizer = load_model(target_dir), load_tokenizer(target_dir)
    head = FeatureHead.load(out, target)
    prompts = [
        tokenizer(render_prompt(r, tokenizer), add_special_tokens=False)["input_ids"] for r in read_rows(heldout)[:6]
    ]
    results = FeatureSpecDecoder(target, head, 3).generate([GenerationRequest(p, 24) for p in prompts])
    for prompt, res in zip(prompts, results, strict=True):
        with torch.no_grad():
            reference = target.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(prompt) :].tolist()
        assert res.token_ids == reference[: len(res.token_ids)] and len(res.token_ids) >= min(len(reference), 1)
    mal = total_stats(results).mean_accepted_length
    print(f"expected MAL (held out) {evals}, decoded MAL on eval prompts {mal:.3f}")
    assert mal > 1.2
