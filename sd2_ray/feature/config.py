"""Settings of a feature head's training (the ``feature_head`` section of ``sd2 finetune``).

With this section the fine-tune stage trains an EAGLE-style head (:mod:`sd2_ray.feature.head`)
instead of a standalone drafter: its ``model`` is then the *target*, whose features the head
reads and whose embedding and LM head it borrows. The target's features are computed by an actor
pool on Ray Data and streamed into the Ray Train workers (:mod:`sd2_ray.feature.stream`); they
are never written anywhere unless ``cache`` names a place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath

Variant = Literal["eagle", "fspad", "fspad-sampling", "fspad-pad"]
LayerChoice = Literal["last", "low-mid-high"]


class FeatureHeadConfig(StageConfig):
    """Shape and variant of a feature head. The sizes are the target's (``for_target`` copies
    them), so a saved head loads without the target's config at hand."""

    variant: Variant = Field("eagle", description="eagle | fspad | fspad-sampling | fspad-pad")
    feature_layers: tuple[int, ...] = Field(
        (-1,), description="indices into the target's hidden_states; (-1,) = EAGLE-1, several = EAGLE-3"
    )
    hidden_size: int = Field(..., ge=1)
    vocab_size: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)
    num_key_value_heads: int = Field(..., ge=1)
    intermediate_size: int = Field(..., ge=1, description="MLP width of the head's decoder layer")
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # layout switches: the defaults are this head's own; EAGLE-1 (and vLLM's
    # EagleLlamaForCausalLM, which an exported head must match exactly) has neither
    fusion_bias: bool = Field(True, description="the fusion's linear map [embedding; feature] -> H has a bias")
    layer_input_norm: bool = Field(
        True, description="the decoder layer RMS-normalises its input (EAGLE-1 and vLLM's EAGLE skip it)"
    )

    @property
    def num_hidden_layers(self) -> int:
        """One decoder layer (read by the MAC count, as a transformers config's field)."""
        return 1

    @property
    def feature_sampling(self) -> bool:
        return self.variant in ("fspad", "fspad-sampling")

    @property
    def partial_alignment(self) -> bool:
        return self.variant in ("fspad", "fspad-pad")

    @classmethod
    def for_target(cls, target_config, variant: Variant = "eagle", **overrides) -> FeatureHeadConfig:
        """A head config sized like ``target_config`` (any transformers config with the usual names)."""
        heads = target_config.num_attention_heads
        rope = getattr(target_config, "rope_parameters", None) or {}
        fields = dict(
            variant=variant,
            hidden_size=target_config.hidden_size,
            vocab_size=target_config.vocab_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            intermediate_size=target_config.intermediate_size,
            rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
            max_position_embeddings=getattr(target_config, "max_position_embeddings", 4096),
        )
        fields.update(overrides)
        return cls(**fields)

    def layer_config(self):
        """The 1-layer Llama config of the head's decoder layer. Eager attention: it takes the
        additive 4D mask built here for any padding side."""
        from transformers import LlamaConfig

        config = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_hidden_layers=1,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_position_embeddings,
        )
        config._attn_implementation = "eager"
        return config


def low_mid_high_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """EAGLE-3-style feature layers as indices into hidden_states: first block, middle, last (the
    last entry of hidden_states is the LM head's input)."""
    return tuple(sorted({1, max(1, num_hidden_layers // 2), -1 % (num_hidden_layers + 1)}))


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
    materialize: bool = Field(
        False,
        description="compute every feature into Ray's object store before training starts (memory: "
        "all of them; the baseline streaming is measured against); default: streamed while training",
    )
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
    vllm_layout: bool = Field(
        False,
        description="EAGLE-1's exact layout (no fusion bias, no input norm on the layer): the one vLLM's "
        "EAGLE loads (sd2_ray/feature/export_vllm.py; eagle variant, last layer only)",
    )
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
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        overrides: dict[str, Any] = {"feature_layers": self.feature_layers(text.num_hidden_layers)}
        if self.intermediate_size:
            overrides["intermediate_size"] = self.intermediate_size
        if self.vllm_layout:
            overrides.update(fusion_bias=False, layer_input_norm=False)
        return FeatureHeadConfig.for_target(text, self.variant, **overrides)
