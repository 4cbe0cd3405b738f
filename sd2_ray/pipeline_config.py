"""``PipelineConfig``: the whole SD² run (``sd2 run``) composed of the stage configs.

A pipeline YAML has run-wide fields (models, prompts, output prefix, K) and one section per
stage holding that stage's own fields; the paths that chain the stages (``target``, ``model``,
``data``, ``output``...) are filled in by the pipeline. Every section is validated against its
stage config when the file is loaded, so a typo in ``finetune`` fails before distillation runs.
Paths may name parts of the embedded model kit: ``kit:target``, ``kit:drafter``,
``kit:drafter-uag``, ``kit:train_prompts``, ``kit:eval_prompts``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from sd2_ray.config import StageConfig

DRAFTERS = ("dense", "dense-sd", "layer-pruned-sd", "sd2", "sparse-sft", "uag")
DrafterName = Literal["dense", "dense-sd", "layer-pruned-sd", "sd2", "sparse-sft", "uag"]
KIT_PREFIX = "kit:"

# Fields the pipeline sets itself; a section may not set them (they would be overwritten).
CHAINED = {
    "distill": {"target", "prompts", "output"},
    "prune": {"model", "calibration", "output"},
    "layer_prune": {"model", "calibration", "output", "method", "sparsity", "pattern"},
    "finetune": {"model", "data", "output", "response_field"},
    "eval": {"target", "drafter", "prompts", "output", "num_speculative_tokens"},
    "serve": {"target", "drafter", "num_speculative_tokens"},
    "tune": {"target", "drafter", "data", "eval_prompts", "output", "num_speculative_tokens"},
}


def stage_classes() -> dict[str, type[StageConfig]]:
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.evaluate.config import EvalConfig
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.serve.config import ServeConfig

    classes = {"distill": DistillConfig, "prune": PruneConfig, "layer_prune": PruneConfig,
               "finetune": FinetuneConfig, "eval": EvalConfig, "serve": ServeConfig}
    try:
        from sd2_ray.tune.config import TuneConfig
        classes["tune"] = TuneConfig
    except ImportError:
        pass
    return classes


def placeholders(section: str) -> dict[str, Any]:
    fill = {"target": "t", "prompts": "p", "output": "o", "model": "m", "calibration": "c",
            "data": "d", "drafter": "d", "eval_prompts": "e"}
    chained = {k: v for k, v in fill.items() if k in CHAINED.get(section, set())}
    if section == "layer_prune":
        chained.update(method="layers", drop_layers=1)
    return chained


def _section_error(section: str, err: ValidationError) -> str:
    """``prune.sparsity: must be in (0, 1)``: the section's first error, one line."""
    first = err.errors()[0]
    field = ".".join([section, *(str(p) for p in first["loc"])])
    msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return f"{field}: {msg}"


class PipelineConfig(StageConfig):
    """The SD² pipeline: distill -> prune -> fine-tune -> eval, with the paper's baselines side by
    side (dense, dense-sd, layer-pruned-sd, sd2, sparse-sft, uag), a report, and optionally a
    Ray Tune search and a served-pair smoke check. Each stage's output under `output` carries a
    manifest; a rerun skips complete stages and resumes the first unfinished one.
    """

    output: str = Field(..., description="prefix for every stage's output, local or s3://")
    target: str = Field("kit:target", description="target model dir (or kit:target)")
    drafter: str = Field("kit:drafter", description="pretrained drafter base to prune (or kit:drafter)")
    uag_drafter: str | None = Field(None, description="cross-family drafter with its own tokenizer "
                                    "(or kit:drafter-uag); none skips the uag baseline")
    train_prompts: str = Field("kit:train_prompts", description="prompts the target distils (JSONL/Parquet)")
    eval_prompts: str = Field("kit:eval_prompts", description="held-out prompts for eval")
    num_speculative_tokens: int = Field(4, ge=1, le=32, description="draft tokens K, the same for every drafter")
    drafters: list[DrafterName] = Field(list(DRAFTERS), description="drafters to build and evaluate")
    drop_layers: int | Literal["auto"] = Field(
        "auto", description="layer-pruned baseline: blocks to drop; auto = the count whose MACs are "
        "closest to the SD² drafter's")
    serve_smoke: bool = Field(True, description="serve the SD² pair once and check one request")
    kit: dict[str, Any] = Field(default_factory=dict, description="model-kit overrides (kit: paths)")
    distill: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields")
    prune: dict[str, Any] = Field(default_factory=dict, description="PruneConfig fields for the SD² drafter")
    layer_prune: dict[str, Any] = Field(default_factory=dict, description="PruneConfig fields, layer baseline")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig fields (all fine-tunes)")
    eval: dict[str, Any] = Field(default_factory=dict, description="EvalConfig fields")
    tune: dict[str, Any] | None = Field(None, description="TuneConfig fields; set to run a search too")
    serve: dict[str, Any] = Field(default_factory=dict, description="ServeConfig fields for the smoke check")

    @model_validator(mode="after")
    def _check_sections(self) -> "PipelineConfig":
        classes = stage_classes()
        for section in ("distill", "prune", "layer_prune", "finetune", "eval", "serve", "tune"):
            values = getattr(self, section)
            if values is None:
                continue
            if section == "tune" and "tune" not in classes:
                raise ValueError("tune: this version has no tune stage")
            clash = sorted(set(values) & CHAINED.get(section, set()))
            if clash:
                raise ValueError(f"{section}.{clash[0]}: set by the pipeline; remove it from the section")
            try:
                classes[section].model_validate({**placeholders(section), **values})
            except ValidationError as err:
                raise ValueError(_section_error(section, err)) from None
        if "uag" in self.drafters and not self.uag_drafter:
            self.drafters = [d for d in self.drafters if d != "uag"]
        return self

    def stage(self, section: str, **chained: Any) -> StageConfig:
        """The stage config of ``section`` with the pipeline's chained paths filled in."""
        from sd2_ray.config import validate

        cls = stage_classes()[section]
        return validate(cls, {**(getattr(self, section) or {}), **chained}, source=section)

    def uses_kit(self) -> bool:
        paths = (self.target, self.drafter, self.uag_drafter or "", self.train_prompts, self.eval_prompts)
        return any(p.startswith(KIT_PREFIX) for p in paths)
