"""``sd2 tune`` on a Ray small enough that one leaked reservation blocks the next trial: 2 CPUs
and 4 *declared* GPUs (the evals ask for a GPU each, as on a GPU cluster; the work runs on CPU).

- ASHA stops a trial; everything its TorchTrainer held (workers, placement group) is released
  in bounded time, so the trial after it runs, and at the end nothing is held.
- A trial whose training workers cannot get their CPUs never reports: the search fails in one
  line naming what waits for which resources, instead of waiting silently.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from sd2_ray.errors import Sd2Error
from sd2_ray.kit import kit_paths
from sd2_ray.tune import report as R
from sd2_ray.tune.config import TuneConfig

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(1800)]
EXT_DIR = os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sd2/torch_extensions"))


@pytest.fixture(scope="module")
def small_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # on a saturated box the raylet can miss Ray's 30 s start-up window
        try:
            ray.init(
                num_cpus=2,
                num_gpus=4,
                include_dashboard=True,
                log_to_driver=False,
                runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": EXT_DIR, "HF_HUB_OFFLINE": "1"}},
            )
            break
        except Exception as err:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
    yield ray
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
        max_steps=6,
        max_eval_prompts=4,
        eval_max_new_tokens=16,
        eval_gpus=1,
        eval_device="auto",
        prune={"method": "magnitude", "num_cpus": 0.5},
        finetune={"workers": 1, "batch_size": 4, "seq_len": 96, "checkpoint_every": 3, "warmup_steps": 1},
    )
    base.update(kwargs)
    return base


def held(ray) -> tuple[list[str], dict[str, float]]:
    """(states of placement groups not removed, resources not free)."""
    from ray.util.placement_group import placement_group_table

    groups = [g["state"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
    total, free = ray.cluster_resources(), ray.available_resources()
    busy = {k: total[k] - free.get(k, 0.0) for k in ("CPU", "GPU") if total.get(k, 0) - free.get(k, 0.0) > 1e-6}
    return groups, busy


def test_a_trial_asha_stops_releases_what_its_trainer_held(small_ray, kit_dir, tmp_path):
    """lr 10 diverges and ASHA stops it at its one rung (step 2 of 4); the trial after it (past
    the rung: any loss below the midpoint of a good and a diverged one) needs the CPU the stopped
    trial's TorchTrainer held and still runs to the end; afterwards nothing is held."""
    from sd2_ray.tune.job import main

    out = str(tmp_path / "asha")
    began = time.monotonic()
    main(
        TuneConfig.model_validate(
            settings(
                kit_dir,
                out,
                search_space={"sparsity": [0.5], "lr": [3e-3, 10.0, 3.2e-3]},
                asha={"grace_period": 2, "reduction_factor": 2},
                max_steps=4,
                stall_timeout_s=300,
            )
        )
    )
    trials = {t["lr"]: t for t in json.load(open(os.path.join(out, R.TRIALS_FILE)))}
    assert trials[10.0]["status"] == R.STOPPED and trials[10.0]["steps"] < 4 and trials[10.0]["mal"] is None
    assert trials[3e-3]["status"] == R.COMPLETED and trials[3e-3]["steps"] == 4
    assert trials[3.2e-3]["status"] == R.COMPLETED and trials[3.2e-3]["mal"] is not None  # ran after the stop
    assert len(os.listdir(os.path.join(out, "pruned-cache"))) == 1  # one pruning point, pruned once for 3 trials
    deadline = time.monotonic() + 60
    while held(small_ray) != ([], {}) and time.monotonic() < deadline:
        time.sleep(1)
    assert held(small_ray) == ([], {}), held(small_ray)
    print(f"3 trials, one stopped by ASHA: {time.monotonic() - began:.0f} s")


def test_a_trial_that_cannot_get_its_cpus_fails_the_search_in_one_line(small_ray, kit_dir, tmp_path):
    """The trial's TorchTrainer asks for 2 CPUs where 1.9 are free (the trial itself holds 0.1):
    its placement group can never be placed. The search stops after stall_timeout_s and the
    stage fails with one line naming the placement group it waited for."""
    from sd2_ray.tune.job import main

    cfg = settings(
        kit_dir,
        str(tmp_path / "stall"),
        search_space={"sparsity": [0.5], "lr": [3e-3]},
        asha={"enabled": False},
        stall_timeout_s=60,
        stop_grace_s=5,
    )
    cfg["finetune"] = {**cfg["finetune"], "cpus_per_worker": 2}
    began = time.monotonic()
    with pytest.raises(Sd2Error) as err:
        main(TuneConfig.model_validate(cfg))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "no trial reported" in message
    assert "placement group {CPU: 2}" in message and "stall_timeout_s" in message, message
    assert time.monotonic() - began < 300
    deadline = time.monotonic() + 60
    while held(small_ray) != ([], {}) and time.monotonic() < deadline:
        time.sleep(1)
    assert held(small_ray) == ([], {}), held(small_ray)  # the stuck trial's reservation went too
