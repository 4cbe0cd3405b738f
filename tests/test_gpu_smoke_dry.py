"""The device smoke (bench/gpu_smoke.py) as far as a CPU takes it, on a machine like the device
(no pyarrow): every stage that needs no CUDA runs and passes its checks, the CUDA stages are
skipped and say so, and the JSON holds every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_STAGES = {"eval_bf16", "eval_compiled"}


def fake_kit(root: Path) -> str:
    """The kit's layout with tiny random models sharing a character tokenizer (milliseconds)."""
    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import toy_tokenizer
    from sd2_ray.testing.toy import toy_rows

    tokenizer = toy_tokenizer()
    for part, seed in (("target", 1), ("drafter", 2)):
        tiny_model("llama", seed=seed).save_pretrained(root / part)
        tokenizer.save_pretrained(root / part)
    (root / "prompts").mkdir()
    for name, count, seed in (("train", 32, 0), ("eval", 4, 3)):
        rows = toy_rows(count, seed=seed)
        (root / "prompts" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


@pytest.mark.timeout(900)
def test_cpu_dry_run_passes_every_stage_it_can_and_skips_cuda(tmp_path):
    kit = fake_kit(tmp_path / "kit")
    blocker = tmp_path / "no-pyarrow" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no pyarrow on the device')\n")
    out = tmp_path / "smoke.json"
    env = {
        **os.environ,
        "PYTHONPATH": f"{blocker.parent}{os.pathsep}{REPO}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_smoke.py"),
            "--cpu",
            "--kit",
            kit,
            "--json",
            str(out),
            "--prompts",
            "4",
            "--tokens",
            "8",
            "--out",
            str(tmp_path / "scratch"),
        ],
        capture_output=True,
        text=True,
        timeout=850,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert set(stages) == {"imports", "eval_fp32", "finetune", "memory_3b", "sparsegpt_3b"} | CUDA_STAGES
    for name, record in stages.items():
        if name in CUDA_STAGES:
            assert record == {"status": "skipped", "why": "--cpu: no CUDA"}
        else:
            assert record["status"] == "ok" and record["checks"] and all(record["checks"].values()), (name, record)
    assert stages["imports"]["pyarrow"].startswith("local stand-in")
    assert stages["finetune"]["restored_loss_max_diff"] == 0.0
    assert result["mode"].startswith("cpu dry run")
