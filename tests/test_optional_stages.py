"""Optional work runs only when asked for, and never holds up training.

``sd2 run`` runs its search only when the config opts in (a tune section alone configures
``sd2 tune --config``); a search's checkpoint evals run beside the Train controller, so a report
is taken at once while an eval of the previous checkpoint is still going."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sd2_ray.pipeline.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


def stages_run(config: PipelineConfig, monkeypatch) -> list[str]:
    """The stages ``Pipeline.run`` calls, each replaced by a recorder (no Ray, no models)."""
    from sd2_ray import runtime
    from sd2_ray.pipeline import run

    called: list[str] = []
    monkeypatch.setattr(runtime, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(run.Pipeline, "distill", lambda self: called.append("distill"))
    monkeypatch.setattr(run.Pipeline, "build_drafters", lambda self: called.append("build_drafters") or {})
    monkeypatch.setattr(run.Pipeline, "evaluate", lambda self, dirs: called.append("eval") or {})
    monkeypatch.setattr(run.Pipeline, "tune", lambda self: called.append("tune"))
    monkeypatch.setattr(run.Pipeline, "report", lambda self, reports: called.append("report") or {})
    monkeypatch.setattr(run.Pipeline, "serve_smoke", lambda self: called.append("serve_smoke") or {})
    run.Pipeline(config).run()
    return called


def local_config(tmp_path, **fields) -> PipelineConfig:
    paths = {k: str(tmp_path / k) for k in ("target", "drafter", "train_prompts", "eval_prompts")}
    return PipelineConfig.load(None, {"output": str(tmp_path / "out"), "serve_smoke": False, **paths, **fields})


def test_a_tune_section_alone_is_not_run_by_sd2_run(tmp_path, monkeypatch):
    config = local_config(tmp_path, tune={"search_space": {"sparsity": [0.5]}})
    assert "tune" not in stages_run(config, monkeypatch)


def test_sd2_run_runs_the_search_when_the_config_opts_in(tmp_path, monkeypatch):
    from sd2_ray.errors import ConfigError

    config = local_config(tmp_path, tune={"search_space": {"sparsity": [0.5]}}, run_tune=True)
    assert stages_run(config, monkeypatch) == ["distill", "build_drafters", "eval", "tune", "report"]
    with pytest.raises(ConfigError, match="run_tune"):
        local_config(tmp_path, run_tune=True)  # nothing to run


def test_shipped_pipeline_configs_say_whether_sd2_run_searches():
    for name in ("llama70b_to_llama3b.yaml", "llama70b_to_qwen_uag.yaml", "tiny.yaml"):
        config = PipelineConfig.load(str(REPO / "jobs" / "configs" / name))
        assert not config.run_tune, name  # their tune sections are for `sd2 tune --config`


class Checkpoint:
    """Stands in for a ray.train.Checkpoint (the eval is replaced, so it is never opened)."""


def test_checkpoint_evals_do_not_hold_up_the_train_controller(monkeypatch):
    """Each after_report used to run a whole checkpoint eval (an 8-GPU 70B eval in gpu-tune.yaml)
    before the controller took the next report; now it returns at once, one eval at a time runs
    beside it, and its numbers arrive with a later report (the last report waits for it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from sd2_ray.tune import callbacks

    release = threading.Event()
    started: list[int] = []

    def slow_eval(checkpoint, settings):
        started.append(1)
        release.wait(30)
        return {
            "mean_accepted_length": 2.5,
            "predicted_speedup": 1.8,
            "cost_coefficient": 0.1,
            "drafter_macs_per_token": 10,
        }

    forwarded: list[dict] = []
    monkeypatch.setattr(callbacks, "evaluate_checkpoint", slow_eval)
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # needs a Tune session
    monkeypatch.setattr(
        TuneReportCallback, "after_report", lambda self, ctx, metrics, checkpoint: forwarded.append(dict(metrics[0]))
    )
    cb = callbacks.TrialReportCallback({"eval": {"gpus": 0}, "objective": "mal"})
    began = time.perf_counter()
    cb.after_report(None, [{"step": 5, "loss": 1.0}], Checkpoint())
    cb.after_report(None, [{"step": 6, "loss": 0.9}], None)
    cb.after_report(None, [{"step": 10, "loss": 0.8}], Checkpoint())  # an eval is running: skipped
    assert time.perf_counter() - began < 2.0  # the eval takes as long as the test lets it
    assert len(started) == 1 and not any("mal" in m for m in forwarded)
    release.set()
    cb.after_report(None, [{"step": 12, "loss": 0.7, "final": True}], Checkpoint())
    assert forwarded[-1]["mal"] == 2.5 and forwarded[-1]["checkpoint_step"] == 5
    assert len(started) == 1  # no eval starts at the last report (the trial's own eval follows)
