"""Config of ``sd2 massv``: MASSV drafters for a vision-language target, end to end, with the
comparison the paper makes (a text-only drafter, and the control tuned without images)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sd2_ray.config import StageConfig, StoragePath
from sd2_ray.distill.config import DistillSettings
from sd2_ray.evaluate.config import EvalSettings
from sd2_ray.finetune.config import FinetuneSettings
from sd2_ray.prune.config import PruneSettings

DrafterName = Literal["text-only", "control", "massv", "massv-sd2"]
ALL_DRAFTERS: tuple[DrafterName, ...] = ("text-only", "control", "massv", "massv-sd2")


def _phase1() -> FinetuneSettings:
    return FinetuneSettings(
        workers=1, batch_size=16, seq_len=128, max_steps=200, epochs=4, lr=5e-3, eval_every=50, eval_rows=64
    )


def _phase2() -> FinetuneSettings:
    return FinetuneSettings(workers=1, batch_size=16, seq_len=128, epochs=3, lr=2e-3, eval_every=50, eval_rows=64)


class MassvRunConfig(StageConfig):
    """Distill the target VLM's answers to image + question prompts, prune the drafter's LM, run
    MASSV's two phases (dense and sparse), tune the control, and evaluate every drafter on
    held-out image prompts: each stage the real one (Ray Data, Ray Train), each resumable."""

    output: StoragePath = Field("out/massv", description="output root (local or s3://)")
    target: StoragePath = Field("kit:vlm", description="the target VLM (a LLaVA checkpoint)")
    drafter: StoragePath = Field("kit:drafter", description="the small text LM the drafters start from")
    train_prompts: StoragePath = Field("kit:vision_train_prompts", description="image + question rows to distill")
    captions: StoragePath = Field("kit:vision_captions", description="image–caption rows (phase 1)")
    eval_prompts: StoragePath = Field("kit:vision_eval_prompts", description="held-out image + question rows")
    drafters: list[DrafterName] = Field(
        default_factory=lambda: list(ALL_DRAFTERS), min_length=1, description="drafters to make and evaluate"
    )
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="K of every evaluation")
    seed: int = Field(0, description="seed of the projectors and of the fine-tunes' data order")
    distill: DistillSettings = Field(
        default_factory=lambda: DistillSettings(engine="transformers", actors=2, batch_size=32, max_new_tokens=64)
    )
    prune: PruneSettings = Field(
        default_factory=lambda: PruneSettings(method="sparsegpt", sparsity=0.5, seq_len=128),
        description="the massv-sd2 drafter's pruning (calibrated on the distilled rows)",
    )
    projector: FinetuneSettings = Field(default_factory=_phase1, description="phase 1 (projector only)")
    instruct: FinetuneSettings = Field(
        default_factory=_phase2, description="phase 2 (projector + LM), and the control's tuning"
    )
    eval: EvalSettings = Field(
        default_factory=lambda: EvalSettings(max_new_tokens=64, batch_size=16, measure_baseline=False)
    )

    @field_validator("drafters")
    @classmethod
    def _unique(cls, value: list[DrafterName]) -> list[DrafterName]:
        return list(dict.fromkeys(value))
