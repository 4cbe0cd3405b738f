"""The ``massv`` section of a fine-tune: which MASSV phase it runs, and the target VLM whose
vision tower a text drafter is given before its first phase."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sd2_ray.config import StageConfig, StoragePath


class MassvSettings(StageConfig):
    phase: Literal["projector", "instruct"] = Field(
        ...,
        description="projector: phase 1, only the projector learns (image–caption rows, the LM and the vision "
        "tower frozen); instruct: phase 2, the projector and the LM learn the target VLM's distilled answers "
        "(a pruned LM keeps its masks)",
    )
    target: StoragePath | None = Field(
        None,
        description="the target VLM (a LLaVA dir): needed when `model` is a text LM, which is then given the "
        "target's vision tower and a fresh projector before training (MASSV's drafter)",
    )
    seed: int = Field(0, description="seed of the fresh projector")
    images: bool = Field(
        True,
        description="false: train without the images (their positions stay plain <image> tokens): MASSV's "
        "control, a text-only drafter tuned on the same self-distilled answers",
    )
