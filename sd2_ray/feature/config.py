"""Settings of a feature head's training (the ``feature_head`` section of ``sd2 finetune``).

With this section the fine-tune stage trains an EAGLE-style head (:mod:`sd2_ray.feature.head`)
instead of a standalone drafter: its ``model`` is then the *target*, whose features the head
reads and whose embedding and LM head it borrows. The target's features are computed by an actor
pool on Ray Data and streamed into the Ray Train workers (:mod:`sd2_ray.feature.stream`); they
are never written anywhere unless ``cache`` names a place.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath

Variant = Literal["eagle", "fspad", "fspad-sampling", "fspad-pad"]
LayerChoice = Literal["last", "low-mid-high"]


class FeatureStreamSettings(StageConfig):
    """The actor pool that runs the target over the rows (the same kind of actors as distill's)."""

    actors: int = Field(1, ge=1, description="target replicas computing features")
    batch_size: int = Field(8, ge=1, description="rows per target forward in one actor")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per feature actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per feature actor (0: CPU)")
    max_restarts: int = Field(
        -1, ge=-1, description="restarts of a lost feature actor (-1: unlimited); its batches are retried"
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    cache: StoragePath | None = Field(
        None,
        description="opt-in: write the streamed features once as Parquet here (local or s3://) and "
        "read them back on later epochs and reruns; default: never stored, recomputed every epoch",
    )


class FeatureTrainSettings(StageConfig):
    """What head to train and how its loss is made."""

    variant: Variant = Field("eagle", description="eagle | fspad | fspad-sampling | fspad-pad")
    layers: LayerChoice | list[int] = Field(
        "last",
        description="target features the head reads: last (EAGLE-1: the LM head's input), "
        "low-mid-high (EAGLE-3), or indices into the target's hidden_states",
    )
    intermediate_size: int | None = Field(
        None, ge=1, description="MLP width of the head's decoder layer (default: the target's)"
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the Smooth L1 feature regression")
    token_weight: float = Field(0.1, ge=0, description="weight of the cross-entropy to the target's next token")
    ttt_steps: int = Field(
        0,
        ge=0,
        description="training-time test: also train the head on its own predicted features for this "
        "many further chain steps (EAGLE-3); 0 = teacher-forced only (EAGLE-1/2, FSPAD)",
    )
    stream: FeatureStreamSettings = Field(default_factory=FeatureStreamSettings)

    @field_validator("layers")
    @classmethod
    def _layers_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list of layers; use last, low-mid-high or indices")
        return value

    def feature_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """The layers as indices into the target's ``hidden_states`` (embeddings = 0)."""
        from sd2_ray.feature.head import low_mid_high_layers

        if self.layers == "last":
            return (-1,)
        if self.layers == "low-mid-high":
            return low_mid_high_layers(num_hidden_layers)
        count = num_hidden_layers + 1
        for index in self.layers:
            if not -count <= index < count:
                raise ValueError(f"layer {index} is outside the target's hidden_states (0..{num_hidden_layers})")
        return tuple(self.layers)

    def head_config(self, target_config):
        """The head's shape for this target."""
        from sd2_ray.feature.head import FeatureHeadConfig

        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        overrides = {"feature_layers": self.feature_layers(text.num_hidden_layers)}
        if self.intermediate_size:
            overrides["intermediate_size"] = self.intermediate_size
        return FeatureHeadConfig.for_target(text, self.variant, **overrides)
