"""`sd2 massv` as a user runs it: the shipped config's shape, and the command itself (slow) on a
tiny vision-language pair with a relative output path, then rerun (everything complete: nothing
is redone and the report is the same)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_shipped_massv_config_loads_with_every_drafter():
    from sd2_ray.vision.recipe_config import ALL_DRAFTERS, MassvRunConfig

    config = MassvRunConfig.load(str(REPO / "jobs/configs/massv.yaml"))
    assert tuple(config.drafters) == ALL_DRAFTERS
    assert config.target == "kit:vlm" and config.prune.sparsity == 0.5
    assert config.projector.max_steps and config.instruct.eval_every


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.ray
def test_sd2_massv_makes_and_compares_every_drafter_and_resumes(tmp_path):
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.models.sparsity import load_masks
    from sd2_ray.testing.vision import tiny_vision_dirs, varied_head
    from sd2_ray.vision import scenes
    from sd2_ray.vision.model import save_vlm

    dirs = tiny_vision_dirs(str(tmp_path / "models"))
    target = varied_head(load_model(dirs["target"]))  # answers that are text, not one repeated token
    save_vlm(target, load_tokenizer(dirs["target"]), dirs["target"])
    train = scenes.examples(24, 0, "train")
    captions = scenes.caption_rows(24, 0)
    held = [
        {"id": f"e{i}", "messages": e["messages"], "image": e["image"]}
        for i, e in enumerate(scenes.examples(4, 0, "eval"))
    ]
    small = {"workers": 1, "batch_size": 4, "seq_len": 96, "max_steps": 2}
    config = {
        "output": "out/massv",
        "target": dirs["target"],
        "drafter": dirs["text_drafter"],
        "train_prompts": write_rows(
            tmp_path / "train.jsonl", [{k: e[k] for k in ("messages", "image")} for e in train]
        ),
        "captions": write_rows(tmp_path / "captions.jsonl", captions),
        "eval_prompts": write_rows(tmp_path / "eval.jsonl", held),
        "distill": {"actors": 1, "batch_size": 8, "max_new_tokens": 12},
        "prune": {"method": "sparsegpt", "sparsity": 0.5, "num_samples": 8, "seq_len": 64},
        "projector": small,
        "instruct": {**small, "eval_every": 2, "eval_rows": 4},
        "eval": {"max_new_tokens": 12, "batch_size": 4, "measure_baseline": False},
    }
    (tmp_path / "massv.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sd2_ray.cli", "massv", "--config", "massv.yaml"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out" / "massv"
    report = json.loads((out / "report.json").read_text())
    assert set(report["drafters"]) == {"text-only", "control", "massv", "massv-sd2"}
    for name, row in report["drafters"].items():
        assert 1.0 <= row["mean_accepted_length"] <= 5.0, name
    massv, sparse = report["drafters"]["massv"], report["drafters"]["massv-sd2"]
    assert massv["vision"]["shared_tower"] and massv["vision"]["drafter_projector_macs_per_image"] > 0
    assert report["drafters"]["text-only"]["vision"]["drafter_projector_macs_per_image"] == 0
    assert sparse["drafter_macs_per_token"] < massv["drafter_macs_per_token"]
    assert load_masks(str(out / "drafters" / "massv-sd2"))
    assert type(load_model(str(out / "drafters" / "control"))).__name__ == "LlamaForCausalLM"
    assert "| massv-sd2 |" in (out / "report.md").read_text()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr + again.stdout or "complete, skipping" in again.stderr + again.stdout
    rerun = json.loads((out / "report.json").read_text())
    assert {n: r["mean_accepted_length"] for n, r in rerun["drafters"].items()} == {
        n: r["mean_accepted_length"] for n, r in report["drafters"].items()
    }
