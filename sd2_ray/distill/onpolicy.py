"""On-policy distillation data (DistillSpec): the drafter writes, the target scores.

``sd2 distill --mode on-policy --drafter D --logprobs-top-k K``: for each prompt the drafter
generates a continuation (sampled with the config's temperature / top_p / seed; greedy at 0),
then the target scores it teacher-forced — one forward over prompt + continuation — and the
row stores the drafter's ids as ``response_ids`` with the target's top-k log-probs at every
one of them (:mod:`sd2_ray.distill.scoring`), ``source = drafter``. Fine-tuning on these rows
with a divergence loss trains the drafter where it actually goes at inference.

One actor holds both models (a Ray Data actor pool of :class:`OnPolicyBatchUDF`) rather than a
drafter-generate stage feeding a target-score stage: every replica needs the target anyway,
and the drafter it adds is small (a few % of the target); the target's share of the work is
one teacher-forced forward per batch, so a separate target pool would hold the largest model
mostly idle; and one pool keeps generate mode's knobs (actors, cpus/gpus_per_actor), its
row-by-row fallback, actor restarts and shard resume unchanged, with no second pool to size
against the first on a small machine. What it gives up: sizing the two separately on a
heterogeneous cluster (many cheap drafter replicas feeding few big target replicas).
"""

from __future__ import annotations

from typing import Any

from sd2_ray.distill.core import Generated
from sd2_ray.distill.engines import TransformersBatchUDF, TransformersEngine, generated_of
from sd2_ray.distill.scoring import score_continuations


class OnPolicyBatchUDF(TransformersBatchUDF):
    """Ray Data ``map_batches`` callable: drafter continuations scored by the target."""

    def __init__(self, model_dir: str, drafter_dir: str, settings: dict[str, Any]):
        super().__init__(model_dir, settings)  # the target engine (self.engine)
        self.drafter = TransformersEngine(
            drafter_dir,
            dtype=settings["dtype"],
            device=settings["device"],
            torch_threads=settings.get("torch_threads"),
            trust_remote_code=settings.get("trust_remote_code", False),
        )

    def _generate(self, prompts: list[list[int]], indices: list[int]) -> list[Generated]:
        s = self.settings
        outputs = self.drafter.generate_scored(
            prompts, s["max_new_tokens"], s["temperature"], s["top_p"], seed=s["seed"] + min(indices)
        )
        scored = score_continuations(
            self.engine.model,
            prompts,
            [o.response_ids for o in outputs],
            s["logprobs_top_k"],
            self.engine.pad_id,
            self.engine.device,
        )
        for output, topk in zip(outputs, scored, strict=True):
            output.topk = topk
        return [generated_of(i, self.engine.decode(o.kept), o) for i, o in zip(indices, outputs, strict=True)]
