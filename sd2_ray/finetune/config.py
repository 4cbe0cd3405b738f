"""Config of ``sd2 finetune``: masked sparse fine-tuning on Ray Train + DeepSpeed ZeRO."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, model_validator

from sd2_ray import storage
from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath
from sd2_ray.errors import ConfigError
from sd2_ray.feature.config import FeatureTrainSettings
from sd2_ray.vision.config import MassvSettings

STAGE = "finetune"  # the stage's name in its manifest and metrics.json
CHECKPOINTS_DIR = "_checkpoints"
# Distilled-row columns the distillation losses and the acceptance metric read
# (written by `sd2 distill` with logprobs_top_k > 0; see sd2_ray.distill.core).
TOPK_COLUMNS = ("response_ids", "topk_ids", "topk_logprobs")

# the choices of the settings below, named once for the worker's copy (worker_config.py)
SchedulerName = Literal["cosine", "constant"]
OptimizerName = Literal["torch_adamw", "deepspeed_adamw"]
LossName = Literal["ce", "fkl", "rkl", "jsd", "tvd"]
SelectBy = Literal["loss", "expected_mal"]


class FinetuneSettings(StageConfig):
    """How to fine-tune (the `finetune` section of a pipeline config, and of a search's trials);
    :class:`FinetuneConfig` adds the paths."""

    workers: int = Field(2, ge=1, description="number of Ray Train workers (data-parallel ranks)")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 or 3")
    epochs: int = Field(1, ge=1, description="passes over the data (ignored past max_steps)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(
        8, ge=1, description="global batch: rows per optimizer step over all workers (same for any worker count)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each worker")
    seq_len: int = Field(
        256, ge=8, description="max tokens per row (prompt + response); longer rows are truncated, prompt first"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    scheduler: SchedulerName = Field("cosine", description="lr schedule after warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases/norms)")
    grad_clip: float | None = Field(1.0, gt=0, description="gradient norm clip (none: off)")
    optimizer: OptimizerName = Field(
        "torch_adamw",
        description="client torch.optim.AdamW or DeepSpeed's AdamW (its CPU op is JIT-built on first use)",
    )
    seed: int = Field(0, description="seed of the data shuffle")
    shuffle_buffer: int = Field(
        10000, ge=0, description="rows in the seeded per-epoch shuffle buffer (0: keep file order)"
    )
    stream_data: bool = Field(
        False,
        description="stream the rows from storage in every worker each "
        "epoch (data larger than Ray's object store); default: "
        "read once into the object store, workers iterate that",
    )
    checkpoint_every: int = Field(50, ge=1, description="save a checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept in storage")
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train may do after a failure")
    report_every: int = Field(1, ge=1, description="report metrics to Ray Train every N steps")
    report_interval_s: float = Field(
        2.0,
        ge=0,
        description="at least this many seconds between metric reports (Ray Train's controller "
        "takes one report per worker every 2 s, and a worker's report waits for the previous one to be "
        "taken, so reporting faster stalls training); every step's metrics are still kept in the run's "
        "history; 0 = report every report_every steps",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides merged into the DeepSpeed config (e.g. zero_optimization.offload_optimizer)",
    )
    enforce_masks: bool = Field(
        True, description="keep masked weights at zero (false only for ablations: the sparsity is then lost)"
    )
    use_gpu: bool = Field(False, description="GPU workers with nccl (a cluster); false: CPU + gloo")
    backend: str | None = Field(
        None,
        description="torch.distributed backend (default: nccl with use_gpu, "
        "else gloo); e.g. cuda:gloo makes CPU-tensor collectives fail as under NCCL",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in backward "
        "(activation memory of one block instead of all; ~30 % more compute)",
    )
    min_usable_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="fail when fewer than this share of "
        "the rows are usable (bad rows are skipped and listed in "
        "_skipped.jsonl; with no usable row the stage always fails)",
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker")
    overwrite: bool = Field(False, description="redo a complete output and drop its checkpoints")
    loss: LossName = Field(
        "ce",
        description="ce: cross-entropy on the distilled tokens (SD2); fkl / rkl / jsd / tvd: forward KL, "
        "reverse KL, Jensen-Shannon or total variation to the target's stored top-k distribution (needs "
        "data distilled with logprobs_top_k > 0; see sd2_ray/finetune/losses.py)",
    )
    ce_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a cross-entropy term added to a divergence "
        "loss: loss = divergence + ce_weight x ce (ignored for ce)",
    )
    kd_temperature: float = Field(
        0.0,
        ge=0,
        description="serving temperature the drafter's and target's distributions are compared at "
        "(losses and acceptance); 0 = greedy serving: divergences at temperature 1, acceptance = argmax agreement",
    )
    loss_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="positions whose LM-head logits exist at once while "
        "computing the loss (the fp32 full-vocabulary tensors of a whole batch are "
        "never held)",
    )
    use_response_ids: bool | None = Field(
        None,
        description="train on the target's own token ids (column response_ids) instead of re-tokenising "
        "the response text: true = always (a drafter whose tokenizer is not the one the ids were written "
        "with is refused); false = never; unset = when the drafter has that tokenizer (the distill "
        "manifest names it; rows without a manifest: when the drafter decodes the ids back to the "
        "response), else the text in the drafter's own tokens",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="every N optimizer steps, score held-out rows teacher-forced: loss, acceptance "
        "alpha and expected MAL at num_speculative_tokens (sd2_ray/finetune/acceptance.py); none = off",
    )
    eval_rows: int = Field(
        32,
        ge=1,
        description="distilled rows held out of training for eval_every (the last rows of the data, in file order)",
    )
    select_by: SelectBy = Field(
        "loss",
        description="checkpoint published as the drafter: loss = lowest held-out loss at an "
        "eval_every check (the last step when eval_every is off); expected_mal = highest held-out expected "
        "MAL (needs eval_every and top-k rows)",
    )

    feature_head: FeatureTrainSettings | None = Field(
        None,
        description="train an EAGLE-style feature head (eagle / fspad) instead of a drafter: `model` is "
        "then the target, whose features are streamed to the workers by an actor pool "
        "(sd2_ray/feature/config.py)",
    )

    massv: MassvSettings | None = Field(
        None,
        description="train a MASSV multimodal drafter (a LLaVA drafter: the target VLM's vision tower, a "
        "projector, `model`'s LM) on image + text rows, one phase a run (sd2_ray/vision/config.py)",
    )

    @model_validator(mode="after")
    def _check_massv(self) -> FinetuneSettings:
        if self.massv is not None and (self.loss != "ce" or self.feature_head is not None):
            raise ValueError("massv: trains with loss ce on image + text rows, without a feature_head")
        return self

    @model_validator(mode="after")
    def _check_feature_head(self) -> FinetuneSettings:
        if self.feature_head is not None and self.loss != "ce":
            raise ValueError(
                "loss: a feature head learns the target's features and next tokens "
                "(feature_head.feature_weight / token_weight); leave loss at ce"
            )
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> FinetuneSettings:
        per_step = self.workers * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of workers x grad_accum "
                f"= {per_step} (the global batch stays the same for any worker count)"
            )
        return self

    storage_path: StoragePath | None = Field(
        None,
        description=f"Ray Train storage for checkpoints (local or s3://); default: "
        f"<output>/{CHECKPOINTS_DIR}, so every artifact of the stage stays under its output",
    )
    deepspeed_config: StoragePath | None = Field(
        None, description="DeepSpeed JSON to start from; default: the package's zero<stage>.json"
    )

    def process_group_backend(self) -> str:
        return self.backend or ("nccl" if self.use_gpu else "gloo")

    @model_validator(mode="after")
    def _check_selection(self) -> FinetuneSettings:
        if self.select_by == "expected_mal" and self.eval_every is None:
            raise ValueError("select_by expected_mal needs eval_every (held-out acceptance is measured then)")
        return self

    @property
    def micro_batch(self) -> int:
        """Rows per forward pass on one worker."""
        return self.batch_size // (self.workers * self.grad_accum)


class FinetuneConfig(FinetuneSettings):
    """Fine-tune a (pruned) drafter on distilled rows, keeping its sparsity masks exact.

    Runs a Ray Train TorchTrainer with DeepSpeed ZeRO-2 or ZeRO-3 (gloo on CPU, nccl on GPU),
    reads the data with Ray Data (once into the object store, or streamed by every worker each
    epoch with ``stream_data``), checkpoints every N steps to local or s3:// storage and
    resumes from the latest checkpoint after a worker failure or a rerun.
    """

    model: StoragePath = Field(
        ...,
        description="drafter HF model dir (local or s3://), usually the prune "
        "output with masks/masks.safetensors / sparsity.json",
    )
    data: StoragePath = Field(..., description="distilled rows: Parquet/JSONL file or directory (local or s3://)")
    output: StoragePath = Field(..., description="output dir for the fine-tuned drafter (local or s3://)")
    response_field: str = Field(
        "response", description="column holding the training answer ('response' = the target's distilled answer)"
    )
    run_name: str | None = Field(
        None, description="Ray Train run name under storage_path; default: the output's basename"
    )
    num_speculative_tokens: int = Field(
        4,
        ge=1,
        description="K of the expected MAL reported by eval_every (set by the pipeline and the search: their K)",
    )

    def checkpoint_root(self) -> str:
        return self.storage_path or storage.join(self.output, CHECKPOINTS_DIR)

    def checkpoint_run_name(self) -> str:
        return self.run_name or storage.basename(self.output)

    def checkpoint_run_dir(self) -> str:
        return storage.join(self.checkpoint_root(), self.checkpoint_run_name())


def topk_needs(config: FinetuneSettings) -> list[tuple[str, str]]:
    """(field, what) for every setting that reads the target's stored top-k distribution."""
    needs: list[tuple[str, str]] = []
    if config.feature_head is not None or config.massv is not None:
        return needs  # expected MAL from streamed target features / greedy agreement with the answers
    if config.loss != "ce":
        needs.append(("loss", f"loss {config.loss}"))
    if config.select_by == "expected_mal":
        needs.append(("select_by", "select_by expected_mal"))
    return needs


def check_loss_data(config: FinetuneConfig, columns: Iterable[str]) -> None:
    """Raise a one-line ConfigError naming the field when the configured loss or checkpoint
    selection cannot run on data with these columns (e.g. the Parquet schema's names): called
    before training starts, so a mismatch never surfaces mid-run."""
    have = set(columns)
    missing = [c for c in TOPK_COLUMNS if c not in have]
    for field, what in topk_needs(config):
        if missing:
            raise ConfigError(
                f"field '{field}': {what} needs the target's top-k log-probs, but the data "
                f"has no column {', '.join(missing)} (distil with logprobs_top_k > 0)"
            )
        if config.use_response_ids is False:
            raise ConfigError(
                f"field 'use_response_ids': {what} needs it true or unset (the top-k are aligned "
                "with the target's token ids)"
            )
        if config.response_field != "response":
            raise ConfigError(
                f"field 'response_field': {what} needs 'response' (the top-k belong to the "
                f"distilled response, not '{config.response_field}')"
            )
