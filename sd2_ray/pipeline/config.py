"""``PipelineConfig``: the whole SD² run (``sd2 run``) composed of the stages' typed settings.

A pipeline YAML has run-wide fields (models, prompts, output prefix, K) and one section per
stage holding that stage's *settings* (``PruneSettings``, ``FinetuneSettings``, ...): the paths
that chain the stages are not settings, so a section that names one is an unknown field,
caught when the file is loaded. :mod:`sd2_ray.pipeline.chain` builds every stage's full config
from these. Paths may name parts of the embedded model kit: ``kit:target``, ``kit:drafter``,
``kit:drafter-uag``, ``kit:train_prompts``, ``kit:eval_prompts``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sd2_ray.config import StageConfig, StoragePath
from sd2_ray.distill.config import DistillSettings
from sd2_ray.evaluate.config import EvalSettings
from sd2_ray.feature.config import FeatureTrainSettings
from sd2_ray.finetune.config import FinetuneSettings
from sd2_ray.prune.config import LayerPruneSettings, PruneSettings
from sd2_ray.serve.config import ServeSettings
from sd2_ray.tune.config import TuneSettings

DRAFTERS = ("dense", "dense-sd", "layer-pruned-sd", "sd2", "sd2-kd", "sparse-sft", "uag", "eagle", "fspad")
DrafterName = Literal["dense", "dense-sd", "layer-pruned-sd", "sd2", "sd2-kd", "sparse-sft", "uag", "eagle", "fspad"]
FEATURE_HEADS = ("eagle", "fspad")  # drafters that are feature heads of the target (variant = name)
# What the kd section may change for sd2-kd: the loss and the checkpoint selection. The model,
# data and budget (epochs, steps, lr, batch) stay sd2's, so the two differ only in the loss.
# The loss suited to the decoding mode (DistillSpec), as bench/bench_kd.py measured on the kit
# over 3 seeds: greedy serving, jsd + ce (1.012x sd2; fkl + ce 1.002x); sampled at T = 1,
# fkl + ce (1.065x; jsd + ce 1.031x).
KD_GREEDY = {"loss": "jsd", "ce_weight": 1.0}
KD_SAMPLED = {"loss": "fkl", "ce_weight": 1.0}
KD_FIELDS = ("loss", "ce_weight", "kd_temperature", "loss_chunk_tokens", "eval_every", "eval_rows", "select_by")


class PipelineConfig(StageConfig):
    """The SD² pipeline: distill -> prune -> fine-tune -> eval, with the paper's baselines side by
    side (dense, dense-sd, layer-pruned-sd, sd2, sparse-sft, uag), a report, a served-pair smoke
    check (serve_smoke), and a Ray Tune search only when run_tune opts in. Each stage's output
    under `output` carries a manifest; a rerun skips complete stages and resumes the first
    unfinished one.
    """

    output: StoragePath = Field(..., description="prefix for every stage's output, local or s3://")
    target: StoragePath = Field("kit:target", description="target model dir (or kit:target)")
    drafter: StoragePath = Field("kit:drafter", description="pretrained drafter base to prune (or kit:drafter)")
    uag_drafter: StoragePath | None = Field(
        None, description="cross-family drafter with its own tokenizer (or kit:drafter-uag); needed by the uag drafter"
    )
    train_prompts: StoragePath = Field("kit:train_prompts", description="prompts the target distils (JSONL/Parquet)")
    eval_prompts: StoragePath = Field("kit:eval_prompts", description="held-out prompts for eval")
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="draft tokens K, the same for every drafter")
    drafters: list[DrafterName] | None = Field(
        None,
        description="drafters to build and evaluate (default: all of them but the feature heads "
        "eagle and fspad, which are asked for by name; uag only when uag_drafter is set, sd2-kd only "
        "when distill.logprobs_top_k > 0)",
    )
    drop_layers: int | Literal["auto"] = Field(
        "auto",
        description="layer-pruned baseline: blocks to drop; auto = the count whose MACs are "
        "closest to the SD² drafter's",
    )
    serve_smoke: bool = Field(True, description="serve the SD² pair once and check one request")
    serve_smoke_timeout_s: float | None = Field(
        None,
        gt=0,
        description="how long the smoke check waits for the served pair to be healthy; "
        "default: 180 s plus 10 s per GB of target and drafter weights",
    )
    cluster: StoragePath | None = Field(
        None,
        description="Ray cluster launcher YAML or KubeRay manifest the run is planned against: "
        "`sd2 run` checks every stage's resources and per-GPU memory against its node types first "
        "(see `sd2 plan`)",
    )
    shared_storage: bool = Field(
        False,
        description="a local output path is on a disk every node of the "
        "cluster sees (NFS, EFS); without it a local output on a cluster of several "
        "nodes is refused (use s3://)",
    )
    kit: dict[str, Any] = Field(default_factory=dict, description="model-kit overrides (kit: paths)")
    distill: DistillSettings = Field(default_factory=DistillSettings, description="sd2 distill settings")
    prune: PruneSettings = Field(default_factory=PruneSettings, description="sd2 prune settings for the SD² drafter")
    layer_prune: LayerPruneSettings = Field(
        default_factory=LayerPruneSettings,
        description="calibration settings of the layer baseline "
        "(device, num_gpus and num_cpus default to the prune section's)",
    )
    finetune: FinetuneSettings = Field(
        default_factory=FinetuneSettings, description="sd2 finetune settings (every fine-tuned drafter)"
    )
    feature_head: FeatureTrainSettings = Field(
        default_factory=FeatureTrainSettings,
        description="the eagle and fspad drafters: feature heads of the target trained on its streamed "
        "features (the variant is the drafter's name)",
    )
    feature_finetune: dict[str, Any] = Field(
        default_factory=dict,
        description="the eagle and fspad drafters: finetune fields changed for both heads alike (e.g. "
        "lr: a head starts from random weights, a drafter from a pretrained model)",
    )
    kd: dict[str, Any] = Field(
        default_factory=dict,
        description="the sd2-kd drafter: the finetune section with these fields "
        f"changed (only {', '.join(KD_FIELDS)}; same pruned model, data and budget as sd2), e.g. "
        "{loss: fkl, ce_weight: 1.0, eval_every: 16, select_by: expected_mal}; unset loss: jsd + ce "
        "when eval is greedy (temperature 0), fkl + ce when it samples",
    )
    eval: EvalSettings = Field(default_factory=EvalSettings, description="sd2 eval settings")
    tune: TuneSettings | None = Field(
        None,
        description="sd2 tune settings (`sd2 tune --config` of this "
        "file; `sd2 run` runs the search only with run_tune)",
    )
    run_tune: bool = Field(
        False,
        description="`sd2 run` also runs the tune section's search (GPU hours: "
        "every trial prunes, fine-tunes and evaluates); a tune section alone does not",
    )
    serve: ServeSettings = Field(
        default_factory=ServeSettings, description="sd2 serve settings (the smoke check, `sd2 serve --config`)"
    )

    @field_validator("prune")
    @classmethod
    def _prune_is_sparse(cls, value: PruneSettings) -> PruneSettings:
        if value.method == "layers":
            raise ValueError(
                "method 'layers' is the layer baseline (its settings are the "
                "layer_prune section); the SD² drafter needs sparsegpt, wanda or magnitude"
            )
        return value

    @model_validator(mode="after")
    def _run_tune_needs_a_search(self) -> PipelineConfig:
        if self.run_tune and self.tune is None:
            raise ValueError("run_tune: there is no tune section to run")
        return self

    @model_validator(mode="after")
    def _uag_needs_its_drafter(self) -> PipelineConfig:
        if self.drafters is not None and "uag" in self.drafters and not self.uag_drafter:
            raise ValueError("drafters: 'uag' needs uag_drafter (a cross-family drafter dir, or kit:drafter-uag)")
        return self

    @model_validator(mode="after")
    def _kd_needs_top_k(self) -> PipelineConfig:
        unknown = sorted(set(self.kd) - set(KD_FIELDS))
        if unknown:
            raise ValueError(
                f"kd: {unknown} cannot differ from sd2's fine-tuning (the kd section sets only {', '.join(KD_FIELDS)})"
            )
        self.kd_settings()  # a bad value fails here, at load
        if self.drafters is not None and "sd2-kd" in self.drafters and not self.distill.logprobs_top_k:
            raise ValueError(
                "drafters: 'sd2-kd' needs distill.logprobs_top_k > 0 (it learns the target's stored top-k distribution)"
            )
        return self

    def kd_settings(self) -> FinetuneSettings:
        """The sd2-kd drafter's fine-tuning: the finetune section with the kd section on top."""
        from sd2_ray.config import validate

        mode = KD_GREEDY if self.eval.temperature == 0 else KD_SAMPLED
        defaults = dict(mode) if "loss" not in self.kd else {}
        if "kd_temperature" not in self.finetune.model_fields_set:  # compared as the pair is served
            defaults["kd_temperature"] = self.eval.temperature
        return validate(FinetuneSettings, {**self.finetune.model_dump(), **defaults, **self.kd}, source="kd")

    def feature_settings(self, variant: str) -> FinetuneSettings:
        """A feature head's fine-tuning: the finetune section, feature_finetune on top, and the
        feature_head section with the drafter's variant (eagle and fspad: the same budget)."""
        from sd2_ray.config import validate

        head = self.feature_head.model_copy(update={"variant": variant}).model_dump()
        merged = {**self.finetune.model_dump(), **self.feature_finetune, "feature_head": head}
        return validate(FinetuneSettings, merged, source="feature_finetune")

    @property
    def drafter_names(self) -> list[str]:
        """The drafters this run builds and evaluates, in report order."""
        if self.drafters is not None:
            return list(self.drafters)
        return [
            d
            for d in DRAFTERS
            if (d != "uag" or self.uag_drafter)
            and (d != "sd2-kd" or self.distill.logprobs_top_k)
            and d not in FEATURE_HEADS  # another family, opt-in: a target-sized actor pool to train
        ]

    def with_cluster_placement(self) -> PipelineConfig:
        """A copy whose stage sections ask for the node type each is meant for (the cluster file's
        markers, e.g. gen_node for distill/eval/serve, train_node for prune/fine-tune), except
        where a section sets node_resources itself."""
        if not self.cluster:
            return self
        from sd2_ray.plan.cluster import load_node_types, placed, placed_search

        types = load_node_types(self.cluster)
        update = {
            name: placed(getattr(self, name), types, name)
            for name in ("distill", "prune", "layer_prune", "finetune", "eval", "serve")
        }
        if self.tune is not None:
            update["tune"] = placed_search(self.tune, types)
        return self.model_copy(update=update)

    def kit_overrides(self) -> dict[str, Any]:
        return dict(self.kit)
