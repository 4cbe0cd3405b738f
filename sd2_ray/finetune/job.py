"""``sd2 finetune``: the CLI runner (see :func:`sd2_ray.finetune.trainer.run_finetune`)."""

from __future__ import annotations

import logging

from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.trainer import FinetuneResult, run_finetune

log = logging.getLogger(__name__)


def main(config: FinetuneConfig) -> FinetuneResult:
    result = run_finetune(config)
    s = result.summary
    if result.skipped:
        log.info("finetune: %s already complete", config.output)
    else:
        log.info(
            "finetune: %s written: %s steps (published step %s), loss %.4f -> %.4f, %.0f tokens/s, masked nonzero %s",
            config.output,
            s.get("steps_done"),
            s.get("published_step"),
            s.get("first_loss") or 0.0,
            s.get("final_loss") or 0.0,
            s.get("tokens_per_s_mean") or 0.0,
            s.get("sparsity_check", {}).get("masked_nonzero"),
        )
    return result
