"""`sd2 run` on the model kit under an s3:// prefix (a loopback S3 server). The local run, killed
during fine-tuning and rerun, is the README test (tests/test_user_paths.py)."""

import os
import subprocess
import sys

import pytest

from sd2_ray import manifest, storage

pytestmark = pytest.mark.ray
SMALL = [
    "distill.limit=96",
    "finetune.max_steps=24",
    "finetune.checkpoint_every=8",
    "eval.max_prompts=16",
    "eval.max_new_tokens=32",
]


def run_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "sd2_ray.cli",
        "run",
        "--config",
        "jobs/configs/tiny.yaml",
        "--output",
        str(out),
        *SMALL,
        *extra,
    ]


def env_with_kit(kit_dir):
    return {**os.environ, "SD2_KIT_DIR": kit_dir, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_whole_pipeline_under_s3_prefix(kit_dir, s3_bucket, tmp_path):
    out = f"s3://{s3_bucket}/tiny"
    env = {**env_with_kit(kit_dir), "SD2_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run(
        run_cmd(out, "drafters=[dense,sd2]", "serve_smoke=false"), env=env, capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert manifest.is_complete(out) and manifest.is_complete(out + "/distilled")
    report = storage.read_json(out + "/report/report.json")
    assert [d["name"] for d in report["drafters"]] == ["dense", "sd2"]
    assert storage.exists(out + "/drafters/sd2/sparsity.json")
