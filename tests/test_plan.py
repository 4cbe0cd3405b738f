"""`sd2 plan`: every shipped GPU config fits the shipped cluster (what `sd2 run` checks before it
launches anything), an oversized one is refused in one line naming the stage and the numbers, and
the estimates behave like memory does (checkpointing and more GPUs lower them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sd2_ray.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = [
    "jobs/configs/llama70b_to_llama3b.yaml",
    "jobs/configs/llama70b_to_qwen_uag.yaml",
    "jobs/configs/gpu-tune.yaml",
]


@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("cluster", ["clusters/aws-gpu.yaml", "clusters/kuberay-rayjob.yaml"])
def test_every_shipped_gpu_config_fits_its_cluster(config, cluster, capsys):
    assert cli(["plan", "--config", str(REPO / config), "--cluster", str(REPO / cluster)]) == 0
    out = capsys.readouterr().out
    assert "| finetune" in out and "every stage fits" in out


def test_an_oversized_stage_is_refused_in_one_line_with_its_numbers(tmp_path, capsys):
    config = yaml.safe_load((REPO / GPU_CONFIGS[0]).read_text())
    config["finetune"].update(gradient_checkpointing=False, grad_accum=1)  # micro-batches of 8 x 2048 tokens
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli(["plan", "--config", str(path), "--cluster", str(REPO / "clusters/aws-gpu.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("sd2 plan: finetune: needs ") and "GB per GPU" in err and "activations" in err


def test_estimates_move_the_way_memory_does():
    from sd2_ray.finetune.config import FinetuneSettings
    from sd2_ray.plan.estimate import finetune_need, zero_states_gb
    from sd2_ray.plan.shapes import KNOWN, shape_from_config

    shape = shape_from_config(KNOWN["llama-3.2-3b"], "test")
    assert 3.1e9 < shape.params < 3.3e9  # Llama-3.2-3B has 3.21 B parameters (tied embeddings)
    assert zero_states_gb(shape, 3, 8, False) < zero_states_gb(shape, 3, 4, False) < zero_states_gb(shape, 2, 4, False)
    plain = FinetuneSettings(workers=4, use_gpu=True, batch_size=32, seq_len=2048)
    checkpointed = plain.model_copy(update={"gradient_checkpointing": True})
    assert (
        finetune_need(shape, checkpointed).gpu_gb["activations"] < finetune_need(shape, plain).gpu_gb["activations"] / 5
    )


def test_an_unreadable_model_of_unknown_shape_is_one_line(tmp_path, capsys):
    config = yaml.safe_load((REPO / GPU_CONFIGS[0]).read_text())
    config["drafter"] = str(tmp_path / "no-such-model")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli(["plan", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no-such-model: cannot read config.json" in err and err.count("\n") == 0
