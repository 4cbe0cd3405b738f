"""MASSV's phases through the real `sd2 finetune` (Ray Train + DeepSpeed, 2 workers): phase 1
trains the projector alone (the LM and the vision tower stay bit for bit), phase 2 trains the
projector and a pruned LM with its masks held, and the control trains without the images."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sd2_ray import manifest
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.job import run_finetune
from sd2_ray.models.io import load_model, load_tokenizer

pytestmark = pytest.mark.ray

COMMON = dict(workers=2, batch_size=8, seq_len=96, lr=5e-3, warmup_steps=1, checkpoint_every=4)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    from sd2_ray.finetune.extensions import extensions_dir
    from sd2_ray.runtime import ensure_ray

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    ensure_ray(num_cpus=4, attempts=3)
    yield
    ray.shutdown()


def write_rows(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from sd2_ray.models.sparsity import apply_masks, save_masks
    from sd2_ray.testing.toy import magnitude_masks
    from sd2_ray.testing.vision import tiny_vision_dirs
    from sd2_ray.vision import scenes

    root = tmp_path_factory.mktemp("massv")
    dirs = tiny_vision_dirs(str(root))
    text = load_model(dirs["text_drafter"])
    masks = magnitude_masks(text, 0.5)
    apply_masks(text, masks)
    pruned = str(root / "pruned")
    text.save_pretrained(pruned)
    load_tokenizer(dirs["text_drafter"]).save_pretrained(pruned)
    save_masks(pruned, masks, {"method": "magnitude", "pattern": "unstructured", "target_sparsity": 0.5})
    examples = scenes.examples(24, 0, "train")
    captions = scenes.caption_rows(24, 0)
    answers = [
        {"id": f"a{i}", "messages": e["messages"], "response": e["response"], "image": e["image"]}
        for i, e in enumerate(examples)
    ]
    return {
        **dirs,
        "root": root,
        "pruned": pruned,
        "captions": write_rows(str(root / "captions.jsonl"), captions),
        "answers": write_rows(str(root / "answers.jsonl"), answers),
    }


def params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def run(inputs, name: str, model: str, data: str, massv: dict, **kwargs) -> str:
    out = str(inputs["root"] / name)
    run_finetune(FinetuneConfig(model=model, data=data, output=out, massv=massv, max_steps=6, **{**COMMON, **kwargs}))
    assert manifest.is_complete(out)
    return out


def test_projector_phase_leaves_the_lm_and_tower_unchanged_then_instruct_keeps_the_masks(inputs):
    from sd2_ray.models.sparsity import load_masks, masked_weights_nonzero

    phase1 = run(inputs, "p1", inputs["pruned"], inputs["captions"], {"phase": "projector", "target": inputs["target"]})
    start = load_model(os.path.join(phase1, "_massv_init"))
    after = load_model(phase1)
    target = load_model(inputs["target"])
    text = load_model(inputs["pruned"])
    # the LM: exactly the pruned text drafter's weights, before and after phase 1
    lm_after = params(after, "model.language_model.")
    assert lm_after and all(
        torch.equal(lm_after["model.language_model." + n[6:]], p) for n, p in params(text, "model.").items()
    )
    tower = params(after, "model.vision_tower.")
    assert all(torch.equal(tower[n], p) for n, p in params(target, "model.vision_tower.").items())
    moved = [
        n for n, p in params(after, "model.multi_modal_projector.").items() if not torch.equal(p, params(start, n)[n])
    ]
    assert moved, "phase 1 must train the projector"

    phase2 = run(inputs, "p2", phase1, inputs["answers"], {"phase": "instruct"}, eval_every=3, eval_rows=8)
    tuned = load_model(phase2)
    masks = load_masks(phase1)
    assert masks and all(k.startswith("model.language_model.") for k in masks)
    assert masked_weights_nonzero(tuned, masks) == 0
    changed = [n for n, p in params(tuned, "model.language_model.").items() if not torch.equal(p, lm_after[n])]
    assert changed, "phase 2 must train the LM"
    assert all(torch.equal(params(tuned, "model.vision_tower.")[n], p) for n, p in tower.items())
    metrics = json.load(open(os.path.join(phase2, "metrics.json")))
    assert metrics["steps"][-1]["masked_nonzero"] == 0
    assert 1.0 <= metrics["steps"][-1]["expected_mal"] <= 5.0


def test_control_trains_without_images_and_a_text_lm_needs_the_target(inputs):
    from sd2_ray.errors import ConfigError
    from sd2_ray.vision.model import save_text_lm

    with pytest.raises(ConfigError, match="massv.target"):
        run(inputs, "no-target", inputs["text_drafter"], inputs["answers"], {"phase": "instruct"})
    control = run(
        inputs,
        "control",
        inputs["text_drafter"],
        inputs["answers"],
        {"phase": "instruct", "target": inputs["target"], "images": False},
        workers=1,
    )
    text = save_text_lm(control, str(inputs["root"] / "control-text"))
    lm = load_model(text)
    assert type(lm).__name__ == "LlamaForCausalLM"
    before = load_model(inputs["text_drafter"])
    assert not torch.equal(lm.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
