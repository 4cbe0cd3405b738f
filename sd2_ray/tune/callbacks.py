"""Forward Ray Train reports to Ray Tune (Ray's documented Train V2 + Tune pattern), adding what
ASHA needs: a comparable loss every step and, where configured, MAL measured at checkpoints.

Runs on the Ray Train controller (``UserCallback.after_report``), so the trial's driver
function only starts the TorchTrainer and waits. Imports Ray at module level: only the
trial driver imports this module.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from sd2_ray.runtime import run_with_gpus
from sd2_ray.tune.space import finite_or_inf, objective_value

log = logging.getLogger(__name__)


class TrialReportCallback(TuneReportCallback):
    """``TuneReportCallback`` plus: ``loss`` / ``eval_loss`` made finite-or-inf and the held-out
    ``expected_mal`` (finetune.eval_every) finite-or-minus-inf (a diverged trial must lose at
    ASHA's rung, not compare as NaN), and MAL/predicted speedup measured on a few held-out
    prompts whenever a worker reports an intermediate checkpoint (``checkpoint_eval``)."""

    def __init__(self, checkpoint_eval: dict[str, Any] | None = None):
        super().__init__()
        self._checkpoint_eval = checkpoint_eval

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0]) if metrics else {}
        for key in ("loss", "eval_loss"):  # minimised
            if key in first:
                first[key] = finite_or_inf(first[key])
        if "expected_mal" in first:  # maximised: a trial whose held-out rows scored nothing loses
            first["expected_mal"] = -finite_or_inf(-first["expected_mal"])
        if self._checkpoint_eval and checkpoint is not None and not first.get("final"):
            first.update(self._measure(checkpoint, first.get("step")))
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    def _measure(self, checkpoint, step) -> dict[str, Any]:
        """MAL of the checkpoint's weights; a failed measurement is logged, never fatal."""
        started = time.perf_counter()
        try:
            eval_settings = self._checkpoint_eval["eval"]
            report = run_with_gpus(evaluate_checkpoint, eval_settings["gpus"], checkpoint, self._checkpoint_eval,
                                   resources=eval_settings.get("node_resources"))  # the trial process has no GPUs to give
        except Exception as err:  # the trial's training must not die of a side measurement
            log.warning("checkpoint eval at step %s failed: %s: %s", step, type(err).__name__, err)
            return {}
        out = {"mal": report["mean_accepted_length"], "predicted_speedup": report["predicted_speedup"],
               "cost_coefficient": report["cost_coefficient"],
               "drafter_macs": report["drafter_macs_per_token"]}
        out["objective"] = objective_value(out, self._checkpoint_eval["objective"])
        log.info("step %s: checkpoint MAL %.3f, predicted speedup %.3f (%.1fs)", step, out["mal"],
                 out["predicted_speedup"], time.perf_counter() - started)
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
    return evaluate_pair(settings["target"], drafter, rows, settings["num_speculative_tokens"], eval_settings,
                         drafter_tokenizer=tokenizer, progress=False)
