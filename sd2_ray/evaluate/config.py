"""Config of ``sd2 eval``."""

from __future__ import annotations

from pydantic import Field, model_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath
from sd2_ray.models.device import DeviceName, DtypeName


class EvalSettings(StageConfig):
    """How to evaluate a pair (the `eval` section of a pipeline config; a search's trial evals
    use it too); :class:`EvalConfig` adds the paths."""

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (with the losslessness check)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (sampling only)")
    top_k: int = Field(0, ge=0, description="top-k sampling, 0 = off (sampling only)")
    seed: int = Field(0, description="base seed; a prompt samples with seed + a digest of its tokens (order-free)")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per prompt at most")
    batch_size: int = Field(8, ge=1, description="prompts decoded together")
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts")
    device: DeviceName = Field(
        "auto", description="where the models run: auto (cuda if available, else cpu), cpu, cuda or cuda:N"
    )
    dtype: DtypeName = Field("auto", description="model dtype; auto = bfloat16 on cuda, float32 on cpu")
    device_map: str | None = Field(
        None,
        description="accelerate device_map for the target, e.g. 'auto' to shard a target too "
        "big for one GPU over the visible GPUs (the drafter goes where the target "
        "takes its inputs); overrides device for the target",
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    gpus: float = Field(
        0,
        ge=0,
        description="run the eval as Ray task(s) holding this many GPUs each ("
        "'sd2 run': the baseline and every drafter); 0 = in this process",
    )
    min_usable_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="fail when fewer than this share of "
        "the prompt rows are usable (bad or over-long rows are skipped and listed in "
        "_skipped.jsonl; with no usable row the eval always fails)",
    )
    compile: bool = Field(
        False,
        description="compile the engine's draft and verify steps (torch.compile on "
        "CPU, CUDA graphs on GPU): faster steps after a one-off compile of 40-230 s on CPU, "
        "worth it for long batch-1 serving, not for a short eval",
    )
    measure_baseline: bool = Field(
        True, description="also decode with the target alone to measure speedup (and losslessness for greedy)"
    )
    overwrite: bool = Field(False, description="redo a report whose manifest says complete")

    def pair_kwargs(self) -> dict:
        """The decoding and placement settings :func:`~sd2_ray.evaluate.core.evaluate_pair` takes."""
        return dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
        )

    @model_validator(mode="after")
    def _gpus_need_a_gpu_device(self):
        if self.gpus > 0 and self.device == "cpu" and self.device_map is None:
            raise ValueError("gpus > 0 reserves GPUs that device 'cpu' never uses (set device auto or cuda)")
        return self

    @model_validator(mode="after")
    def _sampling_only_with_temperature(self):
        if self.temperature == 0.0 and (self.top_p < 1.0 or self.top_k > 0):
            raise ValueError("top_p/top_k need temperature > 0 (temperature 0 is greedy)")
        return self


class EvalConfig(EvalSettings):
    """Speculative decoding eval of a target + drafter pair on a prompt set: mean accepted length,
    acceptance by draft position, MACs per token, cost coefficient, predicted and measured speedup
    (wall clock against target-only decoding of the same prompts in the same run) and, for greedy
    runs, whether every output equals the target's own. Writes report.json, report.md, a plot,
    config.yaml and manifest.json next to each other (local or s3://)."""

    target: StoragePath = Field(..., description="target model dir (local or s3://)")
    drafter: StoragePath = Field(..., description="drafter model dir (local or s3://); another tokenizer means UAG")
    prompts: StoragePath = Field(..., description="prompt rows: JSONL/Parquet file or dir (local or s3://)")
    output: StoragePath = Field(
        ...,
        description="report.json path (its directory gets the other files), or a directory to write report.json into",
    )
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="draft tokens K per verification pass")

    @property
    def output_dir(self) -> str:
        from sd2_ray import storage

        return storage.parent(self.output) if self.output.endswith(".json") else self.output

    @property
    def report_path(self) -> str:
        from sd2_ray import storage

        return self.output if self.output.endswith(".json") else storage.join(self.output, "report.json")
