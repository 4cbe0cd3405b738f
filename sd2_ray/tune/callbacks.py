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
    """``TuneReportCallback`` plus: ``loss`` made finite-or-inf (a diverged trial must lose at
    ASHA's rung, not compare as NaN), and MAL/predicted speedup measured on a few held-out
    prompts whenever a worker reports an intermediate checkpoint (``checkpoint_eval``)."""

    def __init__(self, checkpoint_eval: dict[str, Any] | None = None):
        super().__init__()
        self._checkpoint_eval = checkpoint_eval

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0]) if metrics else {}
        if "loss" in first:
            first["loss"] = finite_or_inf(first["loss"])
        if self._checkpoint_eval and checkpoint is not None and not first.get("final"):
            first.update(self._measure(checkpoint, first.get("step")))
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    def _measure(self, checkpoint, step) -> dict[str, Any]:
        """MAL of the checkpoint's weights; a failed measurement is logged, never fatal."""
        started = time.perf_counter()
        try:
            report = run_with_gpus(evaluate_checkpoint, self._checkpoint_eval.get("gpus", 0), checkpoint,
                                   self._checkpoint_eval)  # the trial process has no GPUs to give
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
    """Rebuild the drafter from an intermediate DeepSpeed checkpoint and spec-decode a few prompts.

    The fine-tuning loop stores DeepSpeed's ZeRO files (tag ``ds``) at intermediate steps;
    DeepSpeed's own converter merges them into a full fp32 state dict (ZeRO-2 and ZeRO-3).
    These are files this run just wrote, not an input model.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sd2_ray.evaluate.core import evaluate_pair
    from sd2_ray.finetune.train_loop import DS_TAG
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.models.sparsity import apply_masks, load_masks
    from sd2_ray.rows import read_rows

    with checkpoint.as_directory() as directory:
        state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=DS_TAG)
    drafter = load_model(settings["drafter"])
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(drafter.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the drafter: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    masks = load_masks(settings["drafter"], drafter)
    apply_masks(drafter, masks)  # already zero (gradients are masked); cheap insurance
    rows = read_rows(settings["eval_prompts"], limit=settings["num_prompts"])
    # the target is placed as the trial's eval is (device, dtype, device_map); the drafter follows it
    return evaluate_pair(settings["target"], drafter.eval(), rows, settings["num_speculative_tokens"],
                         drafter_tokenizer=load_tokenizer(settings["drafter"]),
                         max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                         dtype=settings.get("dtype", "float32"), device=settings.get("device", "cpu"),
                         device_map=settings.get("device_map"),
                         measure_baseline=False, progress=False, seed=settings["seed"])
