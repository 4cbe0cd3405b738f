"""Forward Ray Train reports to Ray Tune (Ray's documented Train V2 + Tune pattern), adding what
ASHA needs: a comparable loss every step and, where configured, MAL measured at checkpoints.

Runs on the Ray Train controller (``UserCallback.after_report``), so the trial's driver
function only starts the TorchTrainer and waits; checkpoint evals run beside it, never in the
controller's way. Imports Ray at module level: only the
trial driver imports this module.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ray.tune.integration.ray_train import TuneReportCallback

from sd2_ray.runtime import run_with_gpus
from sd2_ray.tune.space import finite_or_inf, objective_value

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class TrialReportCallback(TuneReportCallback):
    """``TuneReportCallback`` plus: ``loss`` / ``eval_loss`` made finite-or-inf and the held-out
    ``expected_mal`` (finetune.eval_every) finite-or-minus-inf (a diverged trial must lose at
    ASHA's rung, not compare as NaN), and MAL/predicted speedup measured on a few held-out
    prompts of intermediate checkpoints (``checkpoint_eval``).

    The controller takes every worker report through this callback, and a worker's next report
    waits until the previous one is taken: a checkpoint eval (on GPU clusters, the target over a
    whole node's GPUs) run here would stall training after every checkpoint. So one eval at a time
    runs in a background thread; a checkpoint reported while it runs is not measured; its numbers
    (with ``checkpoint_step``, the step it measured) go out with the first report after it ends;
    the last report waits for it."""

    def __init__(self, checkpoint_eval: dict[str, Any] | None = None):
        super().__init__()
        self._checkpoint_eval = checkpoint_eval
        self._pool: ThreadPoolExecutor | None = None  # made on the controller: a thread pool does not pickle
        self._pending: tuple[Any, Future[dict[str, Any]]] | None = None  # (step, future) of the eval in flight

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None, "_pending": None}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0]) if metrics else {}
        for key in ("loss", "eval_loss"):  # minimised
            if key in first:
                first[key] = finite_or_inf(first[key])
        if "expected_mal" in first:  # maximised: a trial whose held-out rows scored nothing loses
            first["expected_mal"] = -finite_or_inf(-first["expected_mal"])
        if self._checkpoint_eval:
            final = bool(first.get("final"))
            first.update(self._collect(wait=final))
            if checkpoint is not None and not final:
                self._start(checkpoint, first.get("step"))
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    def _start(self, checkpoint, step) -> None:
        if self._pending is not None:
            log.debug("step %s: a checkpoint eval is still running; this checkpoint is not measured", step)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-eval")
        self._pending = (step, self._pool.submit(self._measure, checkpoint, step))

    def _collect(self, wait: bool) -> dict[str, Any]:
        """The finished eval's metrics (waiting for it when ``wait``), else nothing."""
        if self._pending is None or not (wait or self._pending[1].done()):
            return {}
        step, future = self._pending
        self._pending = None
        out = future.result()
        return {**out, "checkpoint_step": step} if out else {}

    def _measure(self, checkpoint, step) -> dict[str, Any]:
        """MAL of the checkpoint's weights; a failed measurement is logged, never fatal."""
        started = time.perf_counter()
        settings = self._checkpoint_eval
        assert settings is not None  # evals start only with checkpoint_eval settings
        try:
            eval_settings = settings["eval"]
            report = run_with_gpus(
                evaluate_checkpoint,
                eval_settings["gpus"],
                checkpoint,
                settings,
                resources=eval_settings.get("node_resources"),
            )  # the trial process has no GPUs to give
        except Exception as err:  # the trial's training must not die of a side measurement
            log.warning("checkpoint eval at step %s failed: %s: %s", step, type(err).__name__, err)
            return {}
        out = {
            "mal": report["mean_accepted_length"],
            "predicted_speedup": report["predicted_speedup"],
            "cost_coefficient": report["cost_coefficient"],
            "drafter_macs": report["drafter_macs_per_token"],
        }
        out["objective"] = objective_value(out, settings["objective"])
        log.info(
            "step %s: checkpoint MAL %.3f, predicted speedup %.3f (%.1fs)",
            step,
            out["mal"],
            out["predicted_speedup"],
            time.perf_counter() - started,
        )
        return out


def evaluate_checkpoint(checkpoint, settings: dict[str, Any]) -> dict[str, Any]:
    """Spec-decode a few held-out prompts with the drafter of an intermediate checkpoint."""
    from sd2_ray.evaluate.config import EvalSettings
    from sd2_ray.evaluate.core import evaluate_pair
    from sd2_ray.finetune.checkpoint import drafter_from_checkpoint
    from sd2_ray.rows import read_rows

    eval_settings = EvalSettings.model_validate(settings["eval"])
    with checkpoint.as_directory() as directory:
        drafter, tokenizer = drafter_from_checkpoint(directory, settings["drafter"])
    rows = read_rows(settings["eval_prompts"], limit=eval_settings.max_prompts)
    # the target is placed as the trial's eval is (device, dtype, device_map); the drafter follows it
    return evaluate_pair(
        settings["target"],
        drafter,
        rows,
        settings["num_speculative_tokens"],
        eval_settings,
        drafter_tokenizer=tokenizer,
        progress=False,
    )
