"""``sd2 eval`` on a vision-language pair: a LLaVA target with a MASSV drafter or a text-only
drafter, image rows (data URLs, a path relative to the prompts file, two images in one row), a
text row and an unreadable image (skipped); the report's figures as for text pairs, plus the
per-image costs: the vision tower once per image, each side's projector."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from sd2_ray.evaluate import evaluate_pair
from sd2_ray.evaluate.config import EvalConfig
from sd2_ray.models.io import load_tokenizer
from sd2_ray.models.macs import linear_macs
from sd2_ray.testing.vision import tiny_vision_dirs, varied_head
from sd2_ray.vision import scenes
from sd2_ray.vision.model import load_vlm, save_vlm, vision_macs
from sd2_ray.vision.prefill import text_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = 3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-eval")
    dirs = tiny_vision_dirs(str(root / "models"))
    # a random untied head: the target's outputs vary by image, so "lossless" can fail
    save_vlm(varied_head(load_vlm(dirs["target"])), load_tokenizer(dirs["target"]), dirs["target"])
    examples = scenes.examples(6, 0, "eval")
    os.makedirs(root / "prompts" / "images")
    with open(root / "prompts" / "images" / "scene.png", "wb") as f:
        f.write(scenes.png_bytes(scenes.draw(scenes.random_scene(random.Random(5)))))
    rows = [
        {"id": "a", **{k: examples[0][k] for k in ("category", "messages", "image")}},
        {"id": "b", **{k: examples[1][k] for k in ("category", "messages")}, "image": "images/scene.png"},
        {
            "id": "two",
            "category": "vision",
            "messages": [{"role": "user", "content": "<image> and <image>: which has more shapes?"}],
            "images": [examples[2]["image"], examples[3]["image"]],
        },
        {"id": "no-mark", "category": "vision", "prompt": "What is at the top left?", "image": examples[4]["image"]},
        {"id": "text", "category": "text", "prompt": "How many shapes are there?"},
        {"id": "missing", "category": "vision", "prompt": "Describe the image.", "image": "images/none.png"},
    ]
    prompts = root / "prompts" / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(
        target=dirs["target"],
        drafter=dirs["drafter"],
        prompts=str(prompts),
        output=str(root / "out"),
        num_speculative_tokens=K,
        max_new_tokens=8,
        batch_size=4,
        device="cpu",
    )
    return dirs, rows, config


def check_vision_report(report, config):
    assert 1.0 <= report["mean_accepted_length"] <= K + 1
    assert len(report["per_position_acceptance"]) == K and report["lossless"] is True
    assert report["num_prompts"] == 5 and report["prompt_ids"] == ["a", "b", "two", "no-mark", "text"]
    (skip,) = report["skipped_prompts"]
    assert skip["id"] == "missing" and "cannot read" in skip["reason"]
    assert set(report["categories"]) == {"text", "vision"}
    assert all(len(o) > 0 for o in report["outputs"])
    assert len({tuple(o) for o in report["outputs"]}) == 5  # outputs differ by row
    target = load_vlm(config.target)
    assert report["target_macs_per_token"] == linear_macs(text_lm(target))["macs"]  # the LM alone
    vision = report["vision"]
    assert vision["images"] == 5 and vision["image_prompts"] == 4
    per_image = vision_macs(target.config)
    assert vision["vision_tower_macs_per_image"] == per_image["vision_tower"]
    assert vision["target_projector_macs_per_image"] == per_image["projector"]
    assert vision["image_macs"] == 5 * vision["macs_per_image"]
    return vision


def test_massv_and_text_drafters_evaluate_image_rows(case):
    dirs, rows, config = case
    massv = evaluate_pair(dirs["target"], dirs["drafter"], rows, K, config, progress=False)
    vision = check_vision_report(massv, config)
    drafter = load_vlm(dirs["drafter"])
    assert vision["drafter_kind"] == "massv" and vision["shared_tower"] is True
    assert vision["drafter_vision_tower_macs_per_image"] == 0  # the target's pass feeds both projectors
    assert vision["drafter_projector_macs_per_image"] == vision_macs(drafter.config)["projector"] > 0
    assert massv["drafter_macs_per_token"] == linear_macs(text_lm(drafter))["macs"]
    assert 0 < massv["cost_coefficient"] < 1

    text = evaluate_pair(dirs["target"], dirs["text_drafter"], rows, K, config, progress=False)
    vision = check_vision_report(text, config)
    assert vision["drafter_kind"] == "text" and vision["drafter_macs_per_image"] == 0
    assert text["cross_tokenizer"] is False  # the text drafter has the target's tokenizer
    assert text["outputs"] == massv["outputs"]  # lossless: both equal the target's own


def test_pruned_drafter_costs_less_per_token_and_the_same_per_image(case):
    dirs, rows, config = case
    settings = config.model_copy(update={"measure_baseline": False})
    full = evaluate_pair(dirs["target"], dirs["drafter"], rows, K, settings, progress=False)
    drafter = load_vlm(dirs["drafter"])
    with torch.no_grad():
        for module in drafter.model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[: module.weight.shape[0] // 2] = 0
    tok = load_tokenizer(dirs["drafter"])
    pruned = evaluate_pair(dirs["target"], drafter, rows, K, settings, progress=False, drafter_tokenizer=tok)
    assert pruned["drafter_macs_per_token"] < full["drafter_macs_per_token"]
    assert pruned["drafter_dense_macs_per_token"] == full["drafter_dense_macs_per_token"]
    assert pruned["drafter_sparsity"] > 0.2 and pruned["cost_coefficient"] < full["cost_coefficient"]
    assert pruned["vision"] == full["vision"]
    assert pruned["target_macs_per_token"] == full["target_macs_per_token"]


def test_sd2_eval_writes_the_report_of_a_vision_pair(case):
    from sd2_ray.evaluate.job import main

    dirs, rows, config = case
    report = main(config.model_copy(update={"drafter": dirs["text_drafter"], "max_new_tokens": 4}))
    assert report is not None and report["vision"]["images"] == 5
    saved = json.loads(open(config.report_path).read())
    assert saved["vision"] == report["vision"] and saved["lossless"] is True
