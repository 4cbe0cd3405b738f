"""``sd2 tune`` on a real local Ray with CPU trials on the model kit: a 2x2 grid end to end
(trials.json, table, Pareto plot, best/ drafter that loads and keeps its sparsity), ASHA stopping
a trial with an absurd learning rate, and (slow) restoring a search whose driver was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sd2_ray import manifest
from sd2_ray.kit import kit_paths
from sd2_ray.tune import report as R
from sd2_ray.tune.config import TuneConfig

# Each trial starts a TorchTrainer (~20-40 s of Ray/DeepSpeed start-up on 2 idle cores; many
# minutes when the box is saturated), so these get more than the suite's 900 s default.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(3600)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT_DIR = os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sd2/torch_extensions"))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # logical CPUs: one training worker + Ray Data's read tasks + the trial drivers (0.1 each)
    for attempt in range(3):  # on a saturated box the raylet can miss Ray's 30 s start-up window
        try:
            ray.init(
                num_cpus=4,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": EXT_DIR, "HF_HUB_OFFLINE": "1"}},
            )
            break
        except Exception as err:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
    yield
    ray.shutdown()


def settings(kit_dir: str, out: str, **kwargs) -> dict:
    parts = kit_paths(kit_dir)
    base = dict(
        output=out,
        target=parts["target"],
        drafter=parts["drafter"],
        data=parts["train_prompts"],
        eval_prompts=parts["eval_prompts"],
        max_concurrent=1,
        num_speculative_tokens=4,
        max_steps=4,
        max_eval_prompts=6,
        eval_max_new_tokens=24,
        prune={"method": "magnitude", "num_cpus": 0.5},
        finetune={"workers": 1, "batch_size": 4, "seq_len": 96, "checkpoint_every": 2, "warmup_steps": 1},
    )
    for key, value in kwargs.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def run(config_dict: dict) -> dict:
    from sd2_ray.tune.job import main

    return main(TuneConfig.model_validate(config_dict))


@pytest.fixture(scope="module")
def grid_run(ray_cluster, kit_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tune") / "grid")
    cfg = settings(
        kit_dir,
        out,
        search_space={"sparsity": [0.5, 0.7], "lr": [3e-3]},
        prune={"method": "sparsegpt", "num_samples": 16, "seq_len": 96},
        eval_at_checkpoints=True,
        checkpoint_eval_prompts=2,
        asha={"enabled": False},
    )  # every trial runs to the end (ASHA: its own test)
    started = time.perf_counter()
    summary = run(cfg)
    return {"out": out, "summary": summary, "seconds": time.perf_counter() - started, "config": cfg}


def test_grid_end_to_end(grid_run):
    out = grid_run["out"]
    trials = json.load(open(os.path.join(out, R.TRIALS_FILE)))
    assert len(trials) == 2 and all(t["status"] == R.COMPLETED for t in trials), trials
    assert {(t["sparsity"], t["lr"]) for t in trials} == {(0.5, 3e-3), (0.7, 3e-3)}
    for t in trials:
        assert 1.0 <= t["mal"] <= 5.0 and t["steps"] == 4 and t["attempts"] == 1
        assert t["predicted_speedup"] == pytest.approx(t["mal"] / (4 * t["cost_coefficient"] + 1))
    # a sparser drafter costs fewer MACs (nonzero weights counted)
    macs = {t["sparsity"]: t["drafter_macs"] for t in trials}
    assert macs[0.7] < macs[0.5]
    # the best row has the best objective among completed trials
    best = json.load(open(os.path.join(out, R.BEST_FILE)))
    assert best["objective"] == max(t["predicted_speedup"] for t in trials)
    md = open(os.path.join(out, R.REPORT_FILE)).read()
    assert f"| {best['trial_id']} **best** |" in md
    assert open(os.path.join(out, R.PLOT_FILE), "rb").read(4) == b"\x89PNG"
    assert manifest.is_complete(out)
    # one pruned model per pruning point (trials sharing a point share it: the small-cluster test)
    assert len(os.listdir(os.path.join(out, "pruned-cache"))) == 2


def test_best_drafter_loads_and_keeps_its_sparsity(grid_run):
    from sd2_ray.models.io import load_model
    from sd2_ray.models.sparsity import load_masks, read_report, sparsity_problems

    best_dir = os.path.join(grid_run["out"], R.BEST_DIR)
    best = json.load(open(os.path.join(grid_run["out"], R.BEST_FILE)))
    model = load_model(best_dir)
    masks, report = load_masks(best_dir), read_report(best_dir)
    assert masks and report is not None
    assert sparsity_problems(model, masks, report) == []
    assert report["target_sparsity"] == pytest.approx(best["sparsity"])


def test_checkpoint_mal_reported_to_tune(grid_run):
    """With eval_at_checkpoints, the step-2 checkpoint's MAL reached Tune's results (with a later
    report: the eval runs beside training, tagged with the step it measured)."""
    out = grid_run["out"]
    exp = os.path.join(out, "search")
    found = []
    for trial in os.listdir(exp):
        path = os.path.join(exp, trial, "result.json")
        if os.path.isfile(path):
            for line in open(path):
                row = json.loads(line)
                if row.get("checkpoint_step") == 2 and "mal" in row:
                    found.append(row["mal"])
    assert len(found) == 2 and all(1.0 <= m <= 5.0 for m in found)


@pytest.mark.slow  # 2.5 min; the default suite's ASHA test is tests/test_tune_small_cluster.py
def test_asha_stops_absurd_learning_rate(ray_cluster, kit_dir, tmp_path):
    out = str(tmp_path / "asha")
    steps = 8
    run(
        settings(
            kit_dir,
            out,
            search_space={"sparsity": [0.5], "lr": [3e-3, 10.0]},
            max_steps=steps,
            asha={"grace_period": 2, "reduction_factor": 2},
        )
    )
    trials = {t["lr"]: t for t in json.load(open(os.path.join(out, R.TRIALS_FILE)))}
    assert trials[3e-3]["status"] == R.COMPLETED and trials[3e-3]["steps"] == steps
    bad = trials[10.0]
    assert bad["status"] == R.STOPPED and bad["steps"] < steps and bad["mal"] is None
    assert json.load(open(os.path.join(out, R.BEST_FILE)))["lr"] == 3e-3


RAY_START_TIMEOUT = "timed out during startup"


def _ray_start_timed_out(proc, log) -> bool:
    """The driver died because its local Ray missed the raylet's 30 s start-up window (a
    saturated box): start it again. Any other exit is a failure of the test."""
    return proc.poll() is not None and RAY_START_TIMEOUT in open(log).read()


def _completed_in_state(exp_dir: str) -> int:
    """Trials Tune's saved experiment state records as TERMINATED with a final result."""
    states = (
        sorted(f for f in os.listdir(exp_dir) if f.startswith("experiment_state")) if os.path.isdir(exp_dir) else []
    )
    if not states:
        return 0
    try:
        data = json.load(open(os.path.join(exp_dir, states[-1])))
    except ValueError:
        return 0
    done = 0
    for trial_json, _runtime_json in data.get("trial_data", []):
        if json.loads(trial_json).get("status") == "TERMINATED":
            done += 1
    return done


@pytest.mark.slow
def test_restore_after_killed_driver(kit_dir, tmp_path):
    out = tmp_path / "restore"
    cfg = settings(
        kit_dir, str(out), search_space={"sparsity": [0.5], "lr": [1e-3, 3e-3]}, asha={"enabled": False}, num_cpus=4
    )
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "sd2_ray.cli", "tune", "--config", str(path)]
    exp = str(out / "search")
    deadline = time.time() + 1800
    proc = None
    try:
        while _completed_in_state(exp) < 1:
            if proc is None or _ray_start_timed_out(proc, tmp_path / "first.log"):
                proc = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,
                    stdout=open(tmp_path / "first.log", "w"),
                    stderr=subprocess.STDOUT,
                )
            assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            assert time.time() < deadline, "no trial completed in time"
            time.sleep(1)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            proc.wait()
    assert not manifest.is_complete(str(out))
    done_before = [t for t in os.listdir(out / "trials") if (out / "trials" / t / "result.json").exists()]
    assert done_before

    for _ in range(3):
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if RAY_START_TIMEOUT not in second.stderr:
            break
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restoring the unfinished search" in second.stderr
    trials = json.load(open(out / R.TRIALS_FILE))
    assert len(trials) == 2 and all(t["status"] == R.COMPLETED for t in trials)
    for trial_id in done_before:  # completed before the kill: never started again
        attempts = json.load(open(out / "trials" / trial_id / "attempts.json"))
        assert len(attempts) == 1, trial_id
    assert manifest.is_complete(str(out))
