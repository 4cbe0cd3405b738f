"""Config of ``sd2 prune``: one-shot pruning of a drafter (SparseGPT, Wanda, magnitude, layers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath

METHODS = ("sparsegpt", "wanda", "magnitude", "layers")
UNSTRUCTURED = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4) (at most N nonzeros in every M consecutive inputs); ``unstructured`` -> None."""
    if pattern == UNSTRUCTURED:
        return None
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"must be 'unstructured' or N:M such as 2:4, got '{pattern}'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got '{pattern}'")
    return n, m


def pattern_text(value):
    """An N:M pattern as text. YAML 1.1 (PyYAML, hence config files and CLI flags) reads an
    unquoted 2:4 as the base-60 integer 124; base-60 digits are < 60, so the N:M it came from is
    unambiguous."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        return f"{value // 60}:{value % 60}"
    return str(value).strip().lower() if isinstance(value, (int, str)) else value


class LayerPruneSettings(StageConfig):
    """Calibration and placement settings every pruning run has (the `layer_prune` section of a
    pipeline config: the layer baseline's method and block count are set by the pipeline)."""

    num_samples: int = Field(128, ge=1, description="calibration samples (rows) to use")
    seq_len: int = Field(512, ge=8, description="calibration sequence length in tokens (longer rows are cut)")
    seed: int = Field(0, description="seed for choosing the calibration rows")
    device: str = Field("auto", description="torch device for the pruning math: auto, cpu, cuda, cuda:1")
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    num_gpus: float = Field(0, ge=0, description="GPUs for the Ray task (when run inside a Ray job)")
    num_cpus: float = Field(1, ge=0, description="CPUs for the Ray task (when run inside a Ray job)")
    trust_remote_code: bool = Field(False, description="let transformers run the model's own code")
    overwrite: bool = Field(False, description="redo a complete output instead of skipping it")


class PruneSettings(LayerPruneSettings):
    """How to prune (the `prune` section of a pipeline config); :class:`PruneConfig` adds the paths."""

    method: Literal["sparsegpt", "wanda", "magnitude", "layers"] = Field(
        "sparsegpt", description="pruning method: sparsegpt, wanda, magnitude, or layers (drop blocks)"
    )
    sparsity: float | None = Field(
        None,
        description="fraction of weights to zero per targeted layer, in (0, 1); "
        "default 0.5, or 1-N/M with --pattern N:M",
    )
    pattern: str = Field("unstructured", description="sparsity pattern: unstructured or N:M (2:4, 4:8)")
    drop_layers: int | None = Field(None, description="method layers: how many consecutive decoder blocks to drop")
    targets: list[str] = Field(
        default_factory=lambda: ["*.layers.*"],
        description="linear layers to prune, by module-name pattern (glob, or re:REGEX); "
        "the default is every linear layer inside the decoder blocks (embeddings and LM head stay dense)",
    )
    ignore: list[str] = Field(default_factory=list, description="module-name patterns never pruned")
    dampening: float = Field(0.01, gt=0, description="SparseGPT dampening, fraction of the Hessian's mean diagonal")
    block_size: int = Field(128, ge=1, description="SparseGPT column block size")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"must be in (0, 1), got {value}")
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_from_yaml_int(cls, value):
        return pattern_text(value)

    @field_validator("pattern")
    @classmethod
    def _pattern_is_nm(cls, value: str) -> str:
        value = str(value).strip().lower()
        parse_pattern(value)
        return value

    @field_validator("drop_layers")
    @classmethod
    def _drop_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _method_needs(self) -> PruneSettings:
        nm = parse_pattern(self.pattern)
        if (
            self.method != "layers"
            and nm is not None
            and self.sparsity is not None
            and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9
        ):
            raise ValueError(
                f"sparsity: {self.sparsity} contradicts pattern {self.pattern} "
                f"(which means sparsity {1 - nm[0] / nm[1]:g}); give one of them"
            )
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size: {self.block_size} must be a multiple of M={nm[1]} for {self.pattern}")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The sparsity every targeted layer gets: the requested one, or 1 - N/M."""
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return self.sparsity if self.sparsity is not None else 0.5


class PruneConfig(PruneSettings):
    """One-shot pruning of a drafter, calibrated on distilled data.

    Unstructured:  sd2 prune --model M --calibration D --method sparsegpt --sparsity 0.5 --output O
    N:M:           sd2 prune --model M --calibration D --method wanda --pattern 2:4 --output O
    Layer pruning: sd2 prune --model M --calibration D --method layers --drop-layers 2 --output O

    The output is an HF model dir (zeros in place, tokenizer copied) with masks/masks.safetensors and
    sparsity.json (layer pruning: layer_pruning.json), config.yaml and manifest.json.
    """

    model: StoragePath = Field(..., description="drafter to prune: HF model dir, local or s3://")
    calibration: StoragePath | None = Field(
        None,
        description="calibration data: distilled Parquet dir or prompts JSONL/Parquet "
        "(rows with prompt/messages and optional response); not needed for magnitude",
    )
    output: StoragePath = Field(..., description="output model dir, local or s3://")
    tokenizer: StoragePath | None = Field(None, description="tokenizer dir (default: the model dir)")

    @model_validator(mode="after")
    def _inputs_needed(self) -> PruneConfig:
        if self.method == "layers" and self.drop_layers is None:
            raise ValueError("drop_layers: method 'layers' needs it (--drop-layers N)")
        if self.method in ("sparsegpt", "wanda", "layers") and not self.calibration:
            raise ValueError(f"calibration: method '{self.method}' needs calibration data (--calibration)")
        return self
