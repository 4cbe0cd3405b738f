"""Pure parts of ``sd2 tune`` (no Ray): config checks, the grid, cache keys, the objective,
trial status, best row and Pareto front, and the report files."""

from __future__ import annotations

import json
import math
import os

import pytest

from sd2_ray.errors import ConfigError
from sd2_ray.tune import report as R
from sd2_ray.tune.config import TuneConfig
from sd2_ray.tune.space import (
    NO_LIMIT_STEPS,
    asha_max_t,
    finite_or_inf,
    grid,
    objective_value,
    param_space,
    prune_fields,
    prune_key,
    pruning_points,
)

BASE = dict(output="o", target="t", drafter="d", data="x", eval_prompts="e")


def config(**kwargs) -> TuneConfig:
    return TuneConfig.model_validate({**BASE, **kwargs})


def test_grid_covers_every_combination_in_tune_order():
    cfg = config(search_space={"sparsity": [0.5, 0.7], "pattern": ["2:4"], "lr": [1e-4, 1e-3]})
    points = grid(cfg)
    assert len(points) == 6
    assert {(p["pruning"]["sparsity"], p["pruning"]["pattern"], p["lr"]) for p in points} == {
        (s, pat, lr) for s, pat in [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")] for lr in (1e-4, 1e-3)
    }
    # Tune sorts axes by name and varies the first one ("lr") fastest
    assert [p["lr"] for p in points[:2]] == [1e-4, 1e-3]
    assert param_space(cfg) == {"lr": {"grid_search": [1e-4, 1e-3]}, "pruning": {"grid_search": pruning_points(cfg)}}


def test_optional_axes_and_yaml_base60_pattern():
    cfg = config(
        search_space={
            "sparsity": [],
            "pattern": [124],
            "lr": [1e-4],
            "epochs": [1, 2],
            "method": ["wanda", "magnitude"],
        }
    )
    assert pruning_points(cfg) == [{"sparsity": 0.5, "pattern": "2:4"}]
    assert len(grid(cfg)) == 4 and set(param_space(cfg)) == {"pruning", "lr", "epochs", "method"}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"search_space": {"sparsity": [1.2]}}, "sparsity"),
        ({"search_space": {"sparsity": [], "pattern": []}}, "at least one"),
        ({"search_space": {"pattern": ["unstructured"]}}, "N:M"),
        ({"search_space": {"lr": [-1.0]}}, "lr"),
        ({"prune": {"sparsity": 0.3}}, "set per trial"),
        ({"finetune": {"lr": 0.1}}, "set per trial"),
        ({"asha": {"metric": "mal"}}, "eval_at_checkpoints"),
        ({"asha": {"metric": "expected_mal"}}, "finetune.eval_every"),
        ({"asha": {"metric": "expected_mal"}, "eval_at_checkpoints": True}, "finetune.eval_every"),
        ({"asha": {"metric": "acceptance"}}, "not reported"),
        ({"objective": "speed"}, "objective"),
        ({"eval_device": "tpu"}, "eval_device"),
        ({"eval_gpus": 1}, "eval_gpus"),
        ({"search_space": {"sparsity": [0.5], "typo": 1}}, "unknown field"),
    ],
)
def test_bad_configs_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as err:
        TuneConfig.load(overrides={**BASE, **kwargs})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_asha_can_rank_trials_by_heldout_expected_mal():
    from sd2_ray.tune.driver import scheduler
    from sd2_ray.tune.trial import finetune_config

    cfg = config(
        max_steps=12,
        asha={"metric": "expected_mal"},
        finetune={"eval_every": 3, "select_by": "expected_mal", "loss": "fkl", "ce_weight": 1.0},
    )
    asha = scheduler(cfg)
    assert (asha._metric, asha._mode) == ("expected_mal", "max")  # no eval_at_checkpoints needed
    trial = finetune_config(
        cfg, {"lr": 1e-3, "pruning": {"sparsity": 0.5, "pattern": "unstructured"}}, "pruned", "trial"
    )
    assert (trial.eval_every, trial.select_by, trial.loss, trial.num_speculative_tokens) == (
        3,
        "expected_mal",
        "fkl",
        4,
    )
    assert config(asha={"metric": "eval_loss"}, finetune={"eval_every": 2}).asha.resolved_mode == "min"


def test_prune_fields_and_cache_key():
    cfg = config(search_space={"sparsity": [0.5], "pattern": ["2:4"]}, prune={"method": "wanda", "num_samples": 8})
    unstructured, nm = grid(cfg)[0], grid(cfg)[1]
    f1, f2 = prune_fields(cfg, unstructured), prune_fields(cfg, nm)
    assert f1 == {
        "method": "wanda",
        "num_samples": 8,
        "model": os.path.abspath("d"),
        "calibration": os.path.abspath("x"),
        "sparsity": 0.5,
    }
    assert f2["pattern"] == "2:4" and "sparsity" not in f2
    assert prune_key(f1).startswith("wanda-s0.5-") and prune_key(f2).startswith("wanda-2of4-")
    # the same point with the same settings shares a key; any changed setting gets another one
    assert prune_key(dict(f1)) == prune_key(f1)
    assert prune_key({**f1, "num_samples": 16}) != prune_key(f1)
    magnitude = prune_fields(config(prune={"method": "magnitude"}), grid(config())[0])
    assert "calibration" not in magnitude


def test_asha_horizon_stops_short_of_the_last_step():
    # a rung at the last step would stop fully trained trials before their eval
    assert asha_max_t(config(max_steps=8, asha={"grace_period": 2})) == 7
    assert asha_max_t(config(max_steps=4, asha={"grace_period": 4})) is None  # no rung fits: FIFO
    assert asha_max_t(config(asha={"grace_period": 50})) == NO_LIMIT_STEPS


def test_objective_and_finite_loss():
    m = {"mal": 2.5, "predicted_speedup": 1.8}
    assert objective_value(m, "predicted_speedup") == 1.8 and objective_value(m, "mal") == 2.5
    assert objective_value({"mal": float("nan")}, "mal") is None
    assert objective_value({}, "mal") is None
    assert finite_or_inf(float("nan")) == math.inf and finite_or_inf(None) == math.inf
    assert finite_or_inf(2.0) == 2.0


def record(tid, sparsity, lr, mal=None, macs=None, speedup=None, final=True, error=None, step=4):
    metrics = {"step": step, "loss": 1.0, "final": True}  # Ray Train's last report says final too
    if final:
        metrics.update(
            evaluated=True,
            mal=mal,
            drafter_macs=macs,
            predicted_speedup=speedup,
            cost_coefficient=0.1,
            drafter=f"/trials/{tid}/drafter",
        )
    return {
        "trial_id": tid,
        "params": {"pruning": {"sparsity": sparsity, "pattern": "unstructured"}, "lr": lr},
        "metrics": metrics,
        "error": error,
        "steps_reported": list(range(1, step + 1)),
    }


RECORDS = [
    record("a", 0.5, 1e-4, mal=2.0, macs=100, speedup=1.30),
    record("b", 0.7, 1e-4, mal=1.8, macs=60, speedup=1.35),
    record("c", 0.5, 1e-3, mal=1.9, macs=100, speedup=1.25),  # dominated by a
    record("d", 0.7, 10.0, final=False, step=2),  # stopped by ASHA
    record("f", 0.7, 10.0, final=False, step=4),  # stopped after training, before eval
    record("e", 0.9, 1e-4, final=False, error="RuntimeError: boom", step=0),
]


def test_status_best_and_pareto():
    rows = R.table(RECORDS, "predicted_speedup")
    status = {r["trial_id"]: r["status"] for r in rows}
    assert status == {
        "a": R.COMPLETED,
        "b": R.COMPLETED,
        "c": R.COMPLETED,
        "d": R.STOPPED,
        "e": R.ERRORED,
        "f": R.STOPPED,
    }
    assert R.best_row(rows)["trial_id"] == "b"
    assert R.best_row(R.table(RECORDS, "mal"))["trial_id"] == "a"
    assert [r["trial_id"] for r in R.pareto_front(rows)] == ["b", "a"]
    stopped = next(r for r in rows if r["trial_id"] == "d")
    assert stopped["steps"] == 2 and stopped["mal"] is None and stopped["objective"] is None
    assert R.best_row(R.table(RECORDS[3:], "mal")) is None


def test_write_reports(tmp_path, monkeypatch):
    copied = []
    monkeypatch.setattr(R, "copy_best", lambda best, out: copied.append(best["trial_id"]))
    summary = R.write_reports(str(tmp_path), RECORDS, "predicted_speedup", 4)
    assert summary["completed"] == 3 and summary["stopped_early"] == 2 and summary["errored"] == 1
    assert copied == ["b"] and summary["pareto"] == ["b", "a"]
    trials = json.loads((tmp_path / R.TRIALS_FILE).read_text())
    assert isinstance(trials, list) and len(trials) == 6
    for key in ("sparsity", "lr", "mal", "drafter_macs", "cost_coefficient", "predicted_speedup", "status"):
        assert all(key in t for t in trials)
    md = (tmp_path / R.REPORT_FILE).read_text()
    assert "| b **best** | 0.7 |" in md and "stopped early" in md and "RuntimeError: boom" in md
    assert (tmp_path / R.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trial_lost_to_the_cluster_is_rerun_and_one_that_failed_in_its_code_is_not(tmp_path):
    """Tune reruns every failed trial (trial_max_failures); the trial function itself tells a
    lost node or worker (rerun) from an error in code (raised again at once, no rework)."""
    from ray import exceptions as rx
    from ray.train import TrainingFailedError

    from sd2_ray.errors import Sd2Error
    from sd2_ray.tune.trial import lost_to_the_cluster, record_attempt, record_failure

    assert lost_to_the_cluster(rx.NodeDiedError("node gone")) and lost_to_the_cluster(
        rx.ActorUnavailableError("x", b"0" * 16)
    )
    assert lost_to_the_cluster(TrainingFailedError("group failed 3 times", {}))
    assert not lost_to_the_cluster(rx.RayTaskError("f", "tb", ValueError("bad")))
    assert not lost_to_the_cluster(ValueError("bad")) and not lost_to_the_cluster(Sd2Error("bad field"))
    trial = str(tmp_path / "t1")
    assert record_attempt(trial, {"lr": 1.0}) == 1
    assert record_attempt(trial, {"lr": 1.0}) == 2  # attempt 1 was lost: run again
    record_failure(trial, ValueError("line one\nshape mismatch"))
    with pytest.raises(Sd2Error) as err:
        record_attempt(trial, {"lr": 1.0})
    assert "attempt 2 failed in its own code: ValueError: shape mismatch" in str(err.value)
    assert len(json.load(open(os.path.join(trial, "attempts.json")))) == 2  # the refused start is not counted
    assert TuneConfig.model_fields["trial_max_failures"].default >= 1
