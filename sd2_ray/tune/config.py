"""Config of ``sd2 tune``: Ray Tune (ASHA) search over sparsity x learning rate, scored by
measured acceptance (MAL) and counted draft cost (MACs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sd2_ray import storage
from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath
from sd2_ray.finetune.config import FinetuneSettings
from sd2_ray.models.device import DeviceName, DtypeName
from sd2_ray.prune.config import PruneSettings, pattern_text

OBJECTIVES = ("predicted_speedup", "mal")
# reported by the fine-tuning itself every finetune.eval_every steps (sd2_ray/finetune/heldout.py)
HELDOUT_METRICS = ("expected_mal", "eval_loss")
PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")


class SearchSpace(BaseModel):
    """The grid: every pruning point (unstructured sparsities plus N:M patterns) x lr x epochs x method."""

    model_config = ConfigDict(extra="forbid")

    sparsity: list[float] = Field(
        default_factory=lambda: [0.5], description="unstructured sparsity levels, each in (0, 1)"
    )
    pattern: list[str] = Field(
        default_factory=list, description="N:M patterns searched as well (e.g. ['2:4']); sparsity 1-N/M"
    )
    lr: list[float] = Field(default_factory=lambda: [5e-5], description="fine-tuning peak learning rates")
    epochs: list[int] | None = Field(None, description="fine-tuning epochs to search (default: finetune's)")
    method: list[Literal["sparsegpt", "wanda", "magnitude"]] | None = Field(
        None, description="pruning methods to search (default: the prune section's method)"
    )

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0.0 < v < 1.0:
                raise ValueError(f"each sparsity must be in (0, 1), got {v}")
        return values

    @field_validator("pattern", mode="before")
    @classmethod
    def _patterns(cls, values: Any) -> Any:
        from sd2_ray.prune.config import parse_pattern

        if values is None:
            return []
        out = [pattern_text(v) for v in values]
        for p in out:
            if parse_pattern(p) is None:
                raise ValueError(f"'{p}' is not an N:M pattern (use sparsity for unstructured)")
        return out

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, values: list[float]) -> list[float]:
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"needs at least one learning rate, all > 0, got {values}")
        return values

    @field_validator("epochs")
    @classmethod
    def _epochs_positive(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and (not values or any(v < 1 for v in values)):
            raise ValueError(f"each epochs value must be >= 1, got {values}")
        return values

    @model_validator(mode="after")
    def _something_to_prune(self) -> SearchSpace:
        if not self.sparsity and not self.pattern:
            raise ValueError("sparsity/pattern: give at least one sparsity level or N:M pattern")
        return self


class AshaSettings(BaseModel):
    """ASHA early stopping on the metrics the fine-tuning reports while it trains."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: FIFO, every trial runs to the end")
    metric: str = Field(
        "loss",
        description="metric ASHA compares at each rung: loss (every step), "
        "expected_mal or eval_loss (held-out, every finetune.eval_every steps) or the objective "
        "(only at checkpoints, with eval_at_checkpoints)",
    )
    mode: Literal["min", "max"] | None = Field(None, description="default: min for loss and eval_loss, max otherwise")
    grace_period: int = Field(2, ge=1, description="steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep the best 1/reduction_factor at each rung")
    time_attr: str = Field("step", description="the time axis: fine-tuning optimizer steps")

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric in ("loss", "eval_loss") else "max")


class TuneSettings(StageConfig):
    """How to search (the `tune` section of a pipeline config); :class:`TuneConfig` adds the paths."""

    search_space: SearchSpace = Field(default_factory=SearchSpace, description="the grid searched")
    num_samples: int = Field(1, ge=1, description="repeats of the grid (Tune num_samples)")
    max_concurrent: int = Field(2, ge=1, description="trials in flight at once")
    objective: Literal["predicted_speedup", "mal"] = Field(
        "predicted_speedup",
        description="what the best trial maximises: predicted_speedup = MAL/(K*c+1) with c from counted MACs, or mal",
    )
    max_steps: int | None = Field(None, ge=1, description="fine-tuning steps per trial (ASHA's max_t)")
    max_eval_prompts: int | None = Field(32, ge=1, description="held-out prompts used per trial eval")
    eval_max_new_tokens: int = Field(64, ge=1, description="tokens generated per eval prompt")
    eval_batch_size: int = Field(8, ge=1, description="prompts decoded together in the eval")
    eval_dtype: DtypeName = Field(
        "float32", description="model dtype in the eval (auto: bfloat16 on cuda, float32 on cpu)"
    )
    eval_device: DeviceName = Field("cpu", description="where a trial's eval runs: cpu, auto, cuda, cuda:N")
    eval_device_map: str | None = Field(
        None,
        description="accelerate device_map for the eval's target "
        "(e.g. 'auto' to shard a large target over eval_gpus GPUs)",
    )
    eval_gpus: float = Field(
        0,
        ge=0,
        description="GPUs for each trial's eval, run as a Ray task beside the trial (0: in the trial's own process)",
    )
    eval_at_checkpoints: bool = Field(
        False,
        description="also measure MAL (on checkpoint_eval_prompts "
        "prompts) at every fine-tuning checkpoint and report it to Tune",
    )
    checkpoint_eval_prompts: int = Field(4, ge=1, description="prompts for the checkpoint MAL measurement")
    asha: AshaSettings = Field(default_factory=AshaSettings, description="early stopping")
    prune: PruneSettings = Field(
        default_factory=PruneSettings,
        description="sd2 prune settings for every "
        "trial (method, num_samples, seq_len, ...); sparsity/pattern come from the search",
    )
    finetune: FinetuneSettings = Field(
        default_factory=FinetuneSettings,
        description="sd2 finetune settings for "
        "every trial (workers, batch_size, seq_len, ...); lr comes from the search",
    )
    storage_path: StoragePath | None = Field(
        None, description="Ray Tune experiment storage (local or s3://); default: the output dir"
    )
    name: str = Field("search", description="Tune experiment name under storage_path")
    trial_cpus: float = Field(
        0.1,
        gt=0,
        description="CPUs reserved for each trial's driver function (it only launches the TorchTrainer; Ray rejects 0)",
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    trial_max_failures: int = Field(
        2,
        ge=0,
        description="Tune reruns of a trial whose process was lost (e.g. with its node); its fine-tune "
        "resumes from its checkpoints. A trial that failed in its own code is not rerun",
    )
    stall_timeout_s: float | None = Field(
        None,
        gt=0,
        description="fail the search, naming what waits for which resources, when no trial has "
        "reported for this long (a trial that cannot get its CPUs/GPUs would otherwise wait silently); "
        "default: $SD2_RESOURCE_WAIT_S or 1800",
    )
    stop_grace_s: float = Field(
        30.0,
        gt=0,
        description="how long a trial ASHA stopped may take to exit "
        "before it is killed, which releases its TorchTrainer's workers and "
        "placement group (Tune's own default is 600 s)",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="logical CPUs of the local Ray when there is no "
        "cluster; default: the machine's, at least 4 (a training worker holds 1 "
        "and Ray Data's read tasks need 1 more, or the trial waits forever)",
    )
    seed: int = Field(0, description="eval sampling seed")
    overwrite: bool = Field(False, description="start the search afresh instead of restoring/skipping")

    @model_validator(mode="after")
    def _eval_gpus_need_a_gpu_device(self) -> TuneSettings:
        if self.eval_gpus > 0 and self.eval_device == "cpu" and self.eval_device_map is None:
            raise ValueError(
                "eval_gpus > 0 reserves GPUs that eval_device 'cpu' never uses (set eval_device auto or cuda)"
            )
        return self

    @field_validator("prune")
    @classmethod
    def _prune_section(cls, value: PruneSettings) -> PruneSettings:
        # by value, not by which fields were given: the trials rebuild this config from its dump
        fixed = [
            name
            for name, given in (
                ("sparsity", value.sparsity is not None),
                ("pattern", value.pattern != "unstructured"),
                ("overwrite", value.overwrite),
            )
            if given
        ]
        if fixed:
            raise ValueError(f"{sorted(fixed)} are set per trial by the search, not in the prune section")
        if value.method == "layers":
            raise ValueError("method 'layers' has no sparsity to search")
        return value

    @field_validator("finetune")
    @classmethod
    def _finetune_section(cls, value: FinetuneSettings) -> FinetuneSettings:
        default_lr = FinetuneSettings.model_fields["lr"].default
        fixed = [
            name
            for name, given in (
                ("lr", value.lr != default_lr),
                ("overwrite", value.overwrite),
                ("storage_path", value.storage_path is not None),
            )
            if given
        ]
        if fixed:
            raise ValueError(f"{sorted(fixed)} are set per trial by the search, not in the finetune section")
        return value

    @model_validator(mode="after")
    def _asha_metric_reported(self) -> TuneSettings:
        metric = self.asha.metric
        if not self.asha.enabled or metric == "loss":
            return self
        if metric not in (*OBJECTIVES, "objective", *HELDOUT_METRICS):
            raise ValueError(
                f"asha.metric: '{metric}' is not reported (loss, objective, predicted_speedup, "
                f"mal, {' or '.join(HELDOUT_METRICS)})"
            )
        if metric in HELDOUT_METRICS and not self.finetune.eval_every:
            raise ValueError(
                f"asha.metric: '{metric}' is measured on held-out rows while training; set "
                "finetune.eval_every (or use loss)"
            )
        if metric not in HELDOUT_METRICS and not self.eval_at_checkpoints:
            raise ValueError(
                f"asha.metric: '{metric}' is only measured at checkpoints; set eval_at_checkpoints: true (or use loss)"
            )
        return self

    def eval_settings(self):
        """The trials' evals as typed eval settings (the same ones `sd2 eval` and the pipeline use)."""
        from sd2_ray.evaluate.config import EvalSettings

        return EvalSettings(
            max_new_tokens=self.eval_max_new_tokens,
            batch_size=self.eval_batch_size,
            max_prompts=self.max_eval_prompts,
            dtype=self.eval_dtype,
            device=self.eval_device,
            device_map=self.eval_device_map,
            gpus=self.eval_gpus,
            seed=self.seed,
            node_resources=self.node_resources,
            measure_baseline=False,
        )


class TuneConfig(TuneSettings):
    """Search pruning sparsity x fine-tuning learning rate with Ray Tune + ASHA.

    Each trial prunes the drafter (once per pruning point, cached under OUTPUT/pruned-cache),
    fine-tunes it with the masks on a Ray Train TorchTrainer (loss reported to Tune every step,
    so ASHA stops bad trials early), then measures MAL with speculative decoding on held-out
    prompts and counts the drafter's MACs. Writes trials.json, tune_report.md, pareto.png and
    the best drafter in OUTPUT/best/. A rerun restores an unfinished search (Tuner.restore).

        sd2 tune --config jobs/configs/tiny-tune.yaml [--output O] [--num-samples N] [--max-concurrent C]
    """

    output: StoragePath = Field(..., description="output dir (local or s3://): trials, reports, best/ drafter")
    target: StoragePath = Field(..., description="target model dir (local or s3://)")
    drafter: StoragePath = Field(..., description="dense drafter to prune (local or s3://)")
    data: StoragePath = Field(..., description="fine-tuning rows (distilled): JSONL/Parquet file or dir")
    calibration: StoragePath | None = Field(None, description="pruning calibration rows (default: data)")
    eval_prompts: StoragePath = Field(..., description="held-out prompt rows for measuring MAL (never trained on)")
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="draft tokens K per verification pass")
    cluster: StoragePath | None = Field(None, description="cluster YAML `sd2 plan` checks the trials' stages against")

    def with_cluster_placement(self) -> TuneConfig:
        """A copy whose trials ask for the cluster file's node types (see PipelineConfig's)."""
        if not self.cluster:
            return self
        from sd2_ray.plan.cluster import load_node_types, placed_search

        return placed_search(self, load_node_types(self.cluster))

    @property
    def experiment_root(self) -> str:
        return self.storage_path or self.output

    @property
    def experiment_path(self) -> str:
        return storage.join(self.experiment_root, self.name)

    def trial_dir(self, trial_id: str) -> str:
        return storage.join(self.output, "trials", trial_id)

    def prune_cache_dir(self, key: str) -> str:
        return storage.join(self.output, "pruned-cache", key)
