"""``sd2 serve`` configuration: which pair to serve, how, and how much load to admit."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath
from sd2_ray.models.device import DeviceName, DtypeName
from sd2_ray.vision.images import DEFAULT_MAX_BYTES

API_KEY_ENV = "SD2_API_KEY"
# Spec-Bench's six task groups, the default labels of Serve's per-category acceptance metrics,
# and the kit's code completion
SPEC_BENCH_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
METRIC_CATEGORIES = (*SPEC_BENCH_CATEGORIES, "code")


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling of the model deployment (``autoscaling_config``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="fewest replicas kept running")
    max_replicas: int = Field(2, ge=1, description="most replicas Serve may start")
    target_ongoing_requests: float = Field(4.0, gt=0, description="ongoing requests per replica Serve scales towards")
    # Serve's own defaults (None here) wait 30 s before adding and 600 s before removing a
    # replica, averaging load over 30 s: safe for 70B replicas that take minutes to load, slow
    # for small models or bursty load. Set them to follow load faster. (How often load is reported,
    # 10 s, is set per Serve process by RAY_SERVE_{HANDLE,REPLICA}_AUTOSCALING_METRIC_PUSH_INTERVAL_S
    # in the cluster's environment, no longer per app.)
    upscale_delay_s: float | None = Field(
        None, ge=0, description="seconds load must stay above target before adding replicas (Serve: 30)"
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, description="seconds load must stay below target before removing replicas (Serve: 600)"
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="window over which ongoing requests are averaged (Serve: 30)"
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeSettings(StageConfig):
    """How to serve (the `serve` section of a pipeline config); :class:`ServeConfig` adds the pair."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers (our speculative engine) or vllm (ray.serve.llm)"
    )
    host: str = Field("127.0.0.1", description="HTTP host to bind")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    replicas: int | Literal["auto"] = Field(
        1, description="model replicas, or 'auto' to autoscale with the autoscaling settings"
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="autoscaling (min_replicas, max_replicas, target_ongoing_requests); "
        "setting it turns autoscaling on",
    )
    api_key: str | None = Field(
        None,
        description="require 'Authorization: Bearer KEY' on /v1 (on the command "
        "line it shows in `ps`: prefer api_key_file or $SD2_API_KEY)",
    )
    api_key_file: StoragePath | None = Field(None, description="file holding the API key (first line)")
    model_name: str | None = Field(None, description="model id clients send (default: target dir name)")
    max_batch_size: int = Field(8, ge=1, le=256, description="most requests decoded together per batch")
    speculative_disable_by_batch_size: int | None = Field(
        None,
        ge=2,
        description="transformers engine: batches of at least this many requests decode "
        "without the drafter (at large batches verifying K drafts per row costs more target compute "
        "than accepted tokens save); none = always speculate",
    )
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, le=10, description="how long a batch waits for more requests before starting"
    )
    max_queued_requests: int = Field(
        64, ge=0, description="requests waiting beyond the running batch per replica; more get 503"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="context length: prompt + max_tokens (default: target's positions)"
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat requests that give none")
    dtype: DtypeName = Field("auto", description="weights dtype; auto = bfloat16 on cuda, float32 on cpu")
    device: DeviceName = Field(
        "auto",
        description="transformers engine: where the models run, auto (cuda if "
        "the replica sees one, else cpu), cpu, cuda or cuda:N",
    )
    device_map: str | None = Field(
        None,
        description="transformers engine: accelerate device_map for the target, e.g. 'auto' to "
        "shard it over the replica's GPUs (set gpus_per_replica to match)",
    )
    compile: bool = Field(
        False,
        description="compile the engine's draft and verify steps (torch.compile on "
        "CPU, CUDA graphs on GPU): faster steps after a one-off compile of 40-230 s on CPU, "
        "worth it for long batch-1 serving, not for a short eval",
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    num_cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved by each model replica")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="vllm engine: where each replica runs (decided here, never by probing the machine "
        "that builds the app: a driver or head node has no GPU)",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm engine: GPUs per replica (one node: the placement group is STRICT_PACK)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm engine: share of each GPU's memory vLLM may take (weights + KV cache)"
    )
    gpus_per_replica: float = Field(
        0, ge=0, description="transformers engine: GPUs reserved by each model replica (ray_actor_options num_gpus)"
    )
    allow_remote_images: bool = Field(
        False,
        description="transformers engine, vision-language target: image_url parts may name http(s) URLs, "
        "which the replica then fetches (URLs the client picks, from inside your network); "
        "off: images come inline as data:image/...;base64 URLs only",
    )
    max_image_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=1, description="transformers engine: largest encoded image a request may send (bytes)"
    )
    max_images_per_request: int = Field(
        4,
        ge=0,
        description="transformers engine: most image_url parts in one request (each image also takes "
        "the target's image_seq_length positions of the context)",
    )
    app_name: str = Field("sd2", description="Ray Serve application name")
    metric_categories: list[str] = Field(
        default_factory=lambda: list(METRIC_CATEGORIES),
        description="transformers engine: task categories a request may name in metadata.category "
        "to label its acceptance metrics; any other is counted as 'other', none as 'uncategorized' "
        "(a bounded label set keeps Prometheus series few)",
    )

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @model_validator(mode="after")
    def _placement(self) -> ServeSettings:
        if self.engine == "vllm":
            for name, default in (
                ("device", "auto"),
                ("device_map", None),
                ("gpus_per_replica", 0),
                ("compile", False),
            ):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name} applies to engine 'transformers' (vLLM places the models itself; "
                        "use accelerator and tensor_parallel_size)"
                    )
            if self.accelerator == "cpu" and self.tensor_parallel_size != 1:
                raise ValueError("tensor_parallel_size > 1 needs accelerator gpu")
            if self.speculative_disable_by_batch_size is not None:
                raise ValueError(
                    "speculative_disable_by_batch_size applies to engine 'transformers' "
                    "(vLLM 0.32's speculative_config has no such switch)"
                )
        elif self.gpus_per_replica > 0 and self.device == "cpu" and self.device_map is None:
            raise ValueError("gpus_per_replica > 0 reserves GPUs that device 'cpu' never uses")
        return self

    def effective_api_key(self) -> str | None:
        """The key clients must send: api_key, else the first line of api_key_file, else
        $SD2_API_KEY; None leaves /v1 open."""
        if self.api_key:
            return self.api_key
        if self.api_key_file:
            from sd2_ray import storage

            text = storage.read_text(self.api_key_file).strip().splitlines()
            if not text or not text[0].strip():
                from sd2_ray.errors import ConfigError

                raise ConfigError(f"field 'api_key_file': {self.api_key_file} is empty")
            return text[0].strip()
        return os.environ.get(API_KEY_ENV) or None

    @property
    def autoscaling_enabled(self) -> bool:
        return self.replicas == "auto" or self.autoscaling is not None

    def autoscaling_settings(self) -> dict | None:
        """Serve's ``autoscaling_config`` when autoscaling is on, else None (fixed ``replicas``)."""
        if not self.autoscaling_enabled:
            return None
        return (self.autoscaling or AutoscalingConfig()).model_dump(exclude_none=True)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1"


class ServeConfig(ServeSettings):
    """Serve a target (+ drafter) with speculative decoding behind an OpenAI-compatible API.

    Engines: `transformers` (our lossless speculative engine, CPU default, any pair including
    cross-tokenizer ones; concurrent requests share forward passes through Ray Serve's
    dynamic batching) or `vllm` (Ray Serve LLM with vLLM's draft-model speculative decoding).
    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (SSE with stream=true),
    /v1/spec_stats, /health.
    """

    target: StoragePath = Field(..., description="target model dir (local or s3://)")
    drafter: StoragePath | None = Field(None, description="drafter model dir; none serves the target alone")
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="draft tokens proposed per step (K)")

    @property
    def served_model_name(self) -> str:
        return self.model_name or os.path.basename(self.target.rstrip("/")) or "sd2-target"
