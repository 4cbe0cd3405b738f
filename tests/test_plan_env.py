"""A plan check leaves the process environment as it found it.

``sd2 run`` checks the plan before it starts Ray when its config names a cluster; a local Ray
started afterwards (one GPU box, no ``RAY_ADDRESS``) hands the driver's environment to every
worker. An estimate that set ``DS_ACCELERATOR=cpu`` there made DeepSpeed pick its CPU
accelerator in GPU workers, under an NCCL process group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def test_a_worker_started_after_a_plan_check_sees_no_ds_accelerator(monkeypatch):
    import ray

    from sd2_ray.pipeline.config import PipelineConfig
    from sd2_ray.plan.job import check
    from sd2_ray.runtime import ensure_ray

    if ray.is_initialized():
        pytest.skip("needs to start its own Ray")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    # Workers quiet their libraries per machine (sd2_ray.logs.quiet_worker names the CPU
    # accelerator on a node without GPUs, like this one); verbose mode skips that, so the worker
    # sees exactly what the driver handed it.
    monkeypatch.setenv("SD2_VERBOSE", "1")
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a private Ray, as on a single GPU box
    before = dict(os.environ)
    for name in ("llama70b_to_llama3b.yaml", "llama70b_to_qwen_uag.yaml"):  # ZeRO-3 and ZeRO-2 fine-tunes
        check(PipelineConfig.load(str(REPO / "jobs" / "configs" / name)))
    after = dict(os.environ)
    ensure_ray(num_cpus=1)
    try:

        @ray.remote(num_cpus=0)
        def accelerator():
            return os.environ.get("DS_ACCELERATOR")

        assert ray.get(accelerator.remote()) is None
    finally:
        ray.shutdown()
    assert after == before
