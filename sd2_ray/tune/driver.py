"""The Ray Tune driver: a Tuner over the trial function with ASHA, bounded concurrency, local or
s3:// experiment storage, and ``Tuner.restore`` when an unfinished experiment is there.

Returns the trials as plain records (see :func:`records`) so the report code needs no Ray.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any

from sd2_ray import storage
from sd2_ray.errors import Sd2Error
from sd2_ray.tune.config import TuneConfig
from sd2_ray.tune.space import asha_max_t, param_space

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4


def trainable(config: TuneConfig):
    """The trial function with the search's settings bound and its (small) driver resources."""
    from ray import tune

    from sd2_ray.tune.trial import run_trial

    # only the fields the user set: a trial tells its own defaults (1 worker, per-step reports) apart
    bound = tune.with_parameters(run_trial, settings=config.model_dump(mode="json", exclude_unset=True))
    return tune.with_resources(bound, {"CPU": config.trial_cpus})


def scheduler(config: TuneConfig):
    """ASHA on the fine-tuning step axis; FIFO when disabled."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    max_t = asha_max_t(config)
    if not config.asha.enabled:
        return FIFOScheduler()
    if max_t is None:
        log.warning(
            "tune: asha.grace_period %d leaves no rung before the last step (%s); running every trial to the end",
            config.asha.grace_period,
            config.max_steps,
        )
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=config.asha.time_attr,
        metric=config.asha.metric,
        mode=config.asha.resolved_mode,
        max_t=max_t,
        grace_period=config.asha.grace_period,
        reduction_factor=config.asha.reduction_factor,
        # The final Train report arrives at max_t; the trial must still evaluate its drafter
        # after it, so reaching max_t must not stop it.
        stop_last_trials=False,
    )


def _storage(config: TuneConfig) -> tuple[Any, str]:
    """(pyarrow filesystem or None for local, path inside it) of the experiment root."""
    fs, inner = storage.filesystem(config.experiment_root)
    return (fs if storage.is_s3(config.experiment_root) else None), inner


def stall_stopper(timeout_s: float):
    """A Tune stopper that ends the search when no trial has reported for ``timeout_s``: trials
    whose workers or data tasks cannot get resources never report, and Tune alone would wait
    without end. Its ``stalled_s`` and ``waiting`` (what waited for which resources, taken when it
    tripped, before the stop releases anything) tell the driver why the search ended."""
    from ray.tune import Stopper

    from sd2_ray.runtime import waiting_for_resources

    class StallStopper(Stopper):
        def __init__(self):
            self.last = time.monotonic()
            self.stalled_s: float | None = None
            self.waiting = ""

        def __call__(self, trial_id: str, result: dict) -> bool:
            self.last = time.monotonic()
            return False

        def stop_all(self) -> bool:
            quiet = time.monotonic() - self.last
            if quiet > timeout_s and self.stalled_s is None:
                self.stalled_s = quiet
                self.waiting = waiting_for_resources()
            return self.stalled_s is not None

    return StallStopper()


def build_tuner(config: TuneConfig, stopper=None, sweeper=None):
    """A fresh Tuner, or the restored one when this experiment exists and is unfinished."""
    from ray import tune

    fs, root = _storage(config)
    path = f"{root.rstrip('/')}/{config.name}"
    if not config.overwrite and tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("tune: restoring the unfinished search at %s", config.experiment_path)
        # Completed trials keep their results; running/pending ones start again (their
        # fine-tuning resumes from its own checkpoints); errored ones stay errored.
        return tune.Tuner.restore(
            path,
            trainable=trainable(config),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=fs,
        )
    if config.overwrite:
        storage.delete(config.experiment_path)
    return tune.Tuner(
        trainable(config),
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            scheduler=scheduler(config), num_samples=config.num_samples, max_concurrent_trials=config.max_concurrent
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=root,
            storage_filesystem=fs,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=config.trial_max_failures),
            callbacks=[sweeper] if sweeper else None,
            verbose=1,
        ),
    )


def local_cpus(config: TuneConfig) -> int | None:
    """Logical CPUs for a local Ray (ignored when joining a cluster): a trial's TorchTrainer worker
    holds one and its Ray Data read tasks need another, so 2 cores must still show 4."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        return None
    return config.num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)


def run_search(config: TuneConfig) -> list[dict[str, Any]]:
    """Run (or finish) the search; returns one record per trial."""
    from sd2_ray import runtime
    from sd2_ray.tune import cache

    runtime.ensure_ray(num_cpus=local_cpus(config), dashboard=True)  # the state API finds stray groups
    runtime.require_reachable(config.output)
    cache_actor = cache.start(config.experiment_path)
    from sd2_ray.tune.orphans import OrphanSweeper

    stopper = stall_stopper(config.stall_timeout_s or runtime.resource_wait_s())
    sweeper = OrphanSweeper()
    tuner = build_tuner(config, stopper, sweeper)
    try:
        with trial_stop_grace(config.stop_grace_s):
            results = tuner.fit()
        # a stopped trial's group can still come up seconds after its controller died
        sweeper.final_sweeps(window_s=20.0 if stopper.stalled_s is not None else 6.0)
        if stopper.stalled_s is not None:
            raise Sd2Error(
                f"tune: no trial reported for {stopper.stalled_s:.0f} s "
                f"({stopper.waiting}); the search stopped, rerun to resume it "
                f"(field 'stall_timeout_s')"
            )
    finally:
        import ray

        ray.kill(cache_actor)
    return records(results)


@contextmanager
def trial_stop_grace(seconds: float):
    """Tune kills a stopping trial's actor only after $TUNE_FORCE_TRIAL_CLEANUP_S (600 s by
    default); until then a trial ASHA stopped keeps its TorchTrainer's workers and placement
    group, which a small cluster needs for the next trial. Read by Tune's controller in this
    process when the search starts; put back afterwards."""
    key = "TUNE_FORCE_TRIAL_CLEANUP_S"
    before = os.environ.get(key)
    os.environ[key] = before or str(int(seconds))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def records(results) -> list[dict[str, Any]]:
    """Plain dicts of a ResultGrid: trial id, params, last reported metrics, error, step history."""
    out = []
    for result in results:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        history = _history(result)
        out.append(
            {
                "trial_id": metrics.get("trial_id") or _trial_id(result),
                "params": config,
                "metrics": metrics,
                "error": None
                if result.error is None
                else f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}",
                "steps_reported": history,
                "path": result.path,
            }
        )
    return out


def _trial_id(result) -> str | None:
    return (result.metrics or {}).get("trial_id") or storage.basename(result.path or "")


def _history(result) -> list[int]:
    """The training steps this trial reported to Tune (shows where ASHA stopped it)."""
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame:
        return []
    return [int(s) for s in frame["step"].dropna().tolist()]
