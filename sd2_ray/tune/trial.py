"""One trial of the search, as a Ray Tune function trainable (Ray Train V2's documented pattern:
the trial function is the *driver* of a TorchTrainer run, whose reports reach Tune through
``TuneReportCallback``).

Reads top to bottom: prune (or reuse the cached pruned model for this pruning point), fine-tune
with the masks (loss every step -> Tune -> ASHA may stop the trial here), evaluate the drafter on
the held-out prompts with the speculative-decoding eval core, report the final metrics.
Everything a trial writes lives under ``OUTPUT/trials/<trial_id>/``; a trial restarted by
``Tuner.restore`` finds its fine-tuning checkpoints there and continues from them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sd2_ray import storage
from sd2_ray.tune.config import TuneConfig
from sd2_ray.tune.space import finite_or_inf, objective_value, prune_fields, prune_key, trial_epochs, trial_method

log = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"
EVAL_FILE = "eval.json"
RESULT_FILE = "result.json"
DRAFTER_SUBDIR = "drafter"


def run_trial(params: dict[str, Any], settings: dict[str, Any]) -> None:
    """Tune entry point: ``params`` = this trial's point of the grid, ``settings`` = the TuneConfig."""
    import ray.tune

    logging.basicConfig(level=logging.INFO)
    config = TuneConfig.model_validate(settings)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = config.trial_dir(trial_id)
    attempt = record_attempt(trial_dir, params)
    log.info("trial %s (attempt %d): %s", trial_id, attempt, params)
    try:
        _run_attempt(config, params, trial_dir, attempt)
    except Exception as err:
        if not lost_to_the_cluster(err):
            record_failure(trial_dir, err)
        raise


def _run_attempt(config: TuneConfig, params: dict[str, Any], trial_dir: str, attempt: int) -> None:
    import ray.tune

    started = time.perf_counter()
    fields = prune_fields(config, params)
    pruned = _ensure_pruned(config, fields)
    prune_s = time.perf_counter() - started

    finetune = finetune_config(config, params, pruned["path"], trial_dir)
    started = time.perf_counter()
    trained = _finetune(config, finetune, pruned["path"])
    finetune_s = time.perf_counter() - started

    started = time.perf_counter()
    report = evaluate(config, finetune.output)
    eval_s = time.perf_counter() - started
    storage.write_json(storage.join(trial_dir, EVAL_FILE), {k: v for k, v in report.items() if k != "outputs"})

    final = final_metrics(config, params, report, trained.summary, trial_dir, pruned, attempt)
    final.update(prune_seconds=prune_s, finetune_seconds=finetune_s, eval_seconds=eval_s)
    storage.write_json(storage.join(trial_dir, RESULT_FILE), final)
    ray.tune.report(final)


def record_attempt(trial_dir: str, params: dict[str, Any]) -> int:
    """Append this start to ``attempts.json`` (how often the trial function ran: a restored
    search must not rerun completed trials, and this is how one can tell). Tune reruns a failed
    trial (``trial_max_failures``) whatever failed; an attempt that failed in our own code, where
    a rerun fails the same way, is not run again: its error is raised at once."""
    path = storage.join(trial_dir, ATTEMPTS_FILE)
    attempts = storage.read_json(path) if storage.exists(path) else []
    failed = [(number, a["error"]) for number, a in enumerate(attempts, 1) if a.get("error")]
    if failed:
        from sd2_ray.errors import Sd2Error

        raise Sd2Error(f"trial not rerun: attempt {failed[-1][0]} failed in its own code: {failed[-1][1]}")
    attempts.append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "params": params})
    storage.write_json(path, attempts)
    return len(attempts)


def record_failure(trial_dir: str, err: Exception) -> None:
    """Mark the newest attempt as failed in its own code (see :func:`record_attempt`)."""
    path = storage.join(trial_dir, ATTEMPTS_FILE)
    attempts = storage.read_json(path)
    attempts[-1]["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    storage.write_json(path, attempts)


def lost_to_the_cluster(err: BaseException) -> bool:
    """A failure a rerun can get past: a Ray worker, actor, node or object lost, or a Ray Train
    group that failed more often than its own max_failures; not an error raised by code (ours,
    or in a remote task, which Ray wraps in RayTaskError)."""
    from ray import exceptions as rx
    from ray.train import TrainingFailedError

    if isinstance(err, rx.RayTaskError | rx.UserCodeException | rx.UnserializableException):
        return False
    return isinstance(err, rx.RayError | TrainingFailedError)


def _ensure_pruned(config: TuneConfig, fields: dict[str, Any]) -> dict[str, Any]:
    from sd2_ray.tune.cache import ensure_pruned

    output = config.prune_cache_dir(prune_key(fields))
    result = ensure_pruned(config.experiment_path, fields, output)
    log.info("pruned model %s (%s)", output, "pruned now" if result["pruned_now"] else "cached")
    return result


def finetune_config(config: TuneConfig, params: dict[str, Any], pruned: str, trial_dir: str):
    """The trial's FinetuneConfig: the finetune section, one worker unless it says otherwise,
    this trial's lr/epochs, and outputs + checkpoints inside the trial dir. Every step's loss
    reaches Tune unless the section says otherwise: ASHA decides at its rungs' steps."""
    from sd2_ray.finetune.config import FinetuneConfig

    fields = {
        "workers": 1,
        "report_interval_s": 0.0,
        **config.finetune.model_dump(exclude_unset=True),
        "model": pruned,
        "data": config.data,
        "num_speculative_tokens": config.num_speculative_tokens,
        "output": storage.join(trial_dir, DRAFTER_SUBDIR),
        "lr": float(params["lr"]),
        "epochs": trial_epochs(config, params),
        "storage_path": storage.join(trial_dir, "checkpoints"),
        "run_name": DRAFTER_SUBDIR,
    }
    if config.max_steps is not None:
        fields["max_steps"] = config.max_steps
    return FinetuneConfig.model_validate(fields)


def checkpoint_eval_settings(config: TuneConfig, pruned: str) -> dict[str, Any]:
    """What the checkpoint evals (on the Train controller) need, as plain data."""
    settings = config.eval_settings().model_copy(update={"max_prompts": config.checkpoint_eval_prompts})
    return {
        "target": config.target,
        "drafter": pruned,
        "eval_prompts": config.eval_prompts,
        "num_speculative_tokens": config.num_speculative_tokens,
        "objective": config.objective,
        "eval": settings.to_dict(),
    }


def _finetune(config: TuneConfig, finetune, pruned: str):
    from sd2_ray.finetune.job import run_finetune
    from sd2_ray.tune.callbacks import TrialReportCallback

    settings = checkpoint_eval_settings(config, pruned) if config.eval_at_checkpoints else None
    return run_finetune(finetune, callbacks=[TrialReportCallback(settings)])


def evaluate(config: TuneConfig, drafter: str) -> dict[str, Any]:
    """MAL, acceptance and MACs of the fine-tuned drafter on the held-out prompts (greedy)."""
    from sd2_ray.evaluate.core import evaluate_pair
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import run_with_gpus

    settings = config.eval_settings()
    rows = read_rows(config.eval_prompts, limit=settings.max_prompts)
    # the trial's own process holds only CPUs (fine-tuning has its own workers); the target
    # needs GPUs just for the eval, so they are taken for that task alone
    return run_with_gpus(
        evaluate_pair,
        settings.gpus,
        config.target,
        drafter,
        rows,
        config.num_speculative_tokens,
        settings,
        progress=False,
        resources=settings.node_resources,
    )


def final_metrics(
    config: TuneConfig,
    params: dict[str, Any],
    report: dict[str, Any],
    summary: dict[str, Any],
    trial_dir: str,
    pruned: dict[str, Any],
    attempt: int,
) -> dict[str, Any]:
    """The trial's last Tune report: searched values, training outcome, measured acceptance, cost."""
    out = {
        "evaluated": True,  # not "final": Ray Train's last report already carries final=True
        "step": summary.get("steps_done"),
        "loss": finite_or_inf(summary.get("final_loss")),
        "first_loss": summary.get("first_loss"),
        "sparsity": params["pruning"]["sparsity"],
        "pattern": params["pruning"]["pattern"],
        "method": trial_method(config, params),
        "lr": float(params["lr"]),
        "epochs": trial_epochs(config, params),
        "mal": report["mean_accepted_length"],
        "acceptance_rate": report["acceptance_rate"],
        "per_position_acceptance": report["per_position_acceptance"],
        "num_speculative_tokens": report["num_speculative_tokens"],
        "drafter_macs": report["drafter_macs_per_token"],
        "drafter_dense_macs": report["drafter_dense_macs_per_token"],
        "target_macs": report["target_macs_per_token"],
        "drafter_sparsity": report["drafter_sparsity"],
        "cost_coefficient": report["cost_coefficient"],
        "predicted_speedup": report["predicted_speedup"],
        "eval_prompts": report["num_prompts"],
        # MAL per task category of the eval prompts ({} when they name none); eval.json has the rest
        "category_mal": {name: c["mean_accepted_length"] for name, c in report.get("categories", {}).items()},
        "masked_nonzero": (summary.get("sparsity_check") or {}).get("masked_nonzero"),
        "trial_dir": trial_dir,
        "drafter": storage.join(trial_dir, DRAFTER_SUBDIR),
        "pruned": pruned["path"],
        "attempt": attempt,
    }
    out["objective"] = objective_value(out, config.objective)
    return out
