"""Where every stage of a run reads and writes: the one place that chains stage paths.

``sd2 run`` (:mod:`sd2_ray.pipeline.run`), ``sd2 <stage> --config pipeline.yaml`` and the
search all build their stage configs here, one typed function per stage
(:func:`distill_config`, :func:`prune_config`, :func:`layer_prune_config`,
:func:`finetune_config`, :func:`eval_config`, :func:`serve_config`, :func:`tune_config`), from
the pipeline's run-wide fields and the stage's typed settings section, so they can never
disagree about where an artifact lives. Layout under
``output`` (local or s3://)::

    distilled/                                   the target's own answers to the train prompts
    pruned/sd2/  pruned/layers/                  the sparse drafter; the layer-pruned baseline
    drafters/{dense-sd,layer-pruned-sd,sd2,sd2-kd,sparse-sft}/   fine-tuned drafters (HF dirs)
    eval/target-only.json, eval/<drafter>/report.json     one eval per drafter, same prompts and K
    report/                                      report.json, report.md, plots
    tune/                                        the search (`sd2 tune`, or `sd2 run` with run_tune)
    serve_smoke.json                             one request through the served SD² pair
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from sd2_ray import storage
from sd2_ray.config import StageConfig, validate
from sd2_ray.distill.config import DistillConfig
from sd2_ray.errors import ConfigError
from sd2_ray.evaluate.config import EvalConfig
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.kit import with_kit_paths
from sd2_ray.pipeline.config import FEATURE_HEADS, PipelineConfig
from sd2_ray.prune.config import PruneConfig
from sd2_ray.serve.config import ServeConfig
from sd2_ray.tune.config import TuneConfig

C = TypeVar("C", bound=StageConfig)

# fine-tuned drafter -> (the model it starts from, the column it learns)
FINETUNED = {
    "dense-sd": ("base", "response"),
    "layer-pruned-sd": ("layers", "response"),
    "sd2": ("sd2", "response"),
    "sd2-kd": ("sd2", "response"),
    "sparse-sft": ("sd2", "reference"),
    "eagle": ("target", "response"),  # feature heads: trained on the target's streamed features
    "fspad": ("target", "response"),
}
# layer baseline settings taken from the prune section unless layer_prune sets them
INHERITED_PLACEMENT = ("device", "num_gpus", "num_cpus", "node_resources", "trust_remote_code")


def out(config: PipelineConfig, *parts: str) -> str:
    return storage.join(config.output, *parts)


def distilled_dir(config: PipelineConfig) -> str:
    return out(config, "distilled")


def pruned_dir(config: PipelineConfig, name: str) -> str:
    """``name``: ``sd2`` (the sparse drafter) or ``layers`` (the layer baseline)."""
    return out(config, "pruned", name)


def eval_root(config: PipelineConfig) -> str:
    return out(config, "eval")


def drafter_dir(config: PipelineConfig, name: str) -> str:
    """The model dir a drafter of the report is evaluated from."""
    if name == "dense":
        return config.drafter
    if name == "uag":
        assert config.uag_drafter, "the uag drafter needs uag_drafter (PipelineConfig checks it)"
        return config.uag_drafter
    if name in FINETUNED:
        return out(config, "drafters", name)
    raise ValueError(f"unknown drafter '{name}'")


def _source_model(config: PipelineConfig, source: str) -> str:
    if source == "target":
        return config.target
    return config.drafter if source == "base" else pruned_dir(config, source)


def _stage(cls: type[C], settings: BaseModel, **paths: Any) -> C:
    """A stage's full config: its section's settings plus the chained paths, validated."""
    return validate(cls, {**settings.model_dump(), **paths}, source=cls.__name__)


def distill_config(config: PipelineConfig) -> DistillConfig:
    """The target's answers to the train prompts, into ``distilled/``."""
    return _stage(
        DistillConfig, config.distill, target=config.target, prompts=config.train_prompts, output=distilled_dir(config)
    )


def prune_config(config: PipelineConfig) -> PruneConfig:
    """The SD² drafter: the base drafter pruned on the distilled rows, into ``pruned/sd2/``."""
    return _stage(
        PruneConfig,
        config.prune,
        model=config.drafter,
        calibration=distilled_dir(config),
        output=pruned_dir(config, "sd2"),
    )


def layer_prune_config(config: PipelineConfig, drop_layers: int) -> PruneConfig:
    """The layer-pruned baseline dropping ``drop_layers`` blocks (the run matches them to the SD²
    drafter's MACs), into ``pruned/layers/``; placement from the prune section unless
    ``layer_prune`` sets it."""
    settings = config.layer_prune.model_dump()
    for key in INHERITED_PLACEMENT:
        if key not in config.layer_prune.model_fields_set:
            settings[key] = getattr(config.prune, key)
    return validate(
        PruneConfig,
        {
            **settings,
            "method": "layers",
            "drop_layers": drop_layers,
            "model": config.drafter,
            "calibration": distilled_dir(config),
            "output": pruned_dir(config, "layers"),
        },
        source="layer_prune",
    )


def finetune_config(config: PipelineConfig, drafter: str = "sd2") -> FinetuneConfig:
    """The fine-tune of ``drafter`` (one of :data:`FINETUNED`): from the model it starts from, on
    the column it learns, into ``drafters/<drafter>/``; ``sd2-kd`` with the kd settings."""
    source, field = FINETUNED[drafter]
    settings = config.finetune
    if drafter == "sd2-kd":
        settings = config.kd_settings()
    elif drafter in FEATURE_HEADS:
        settings = config.feature_settings(drafter)
    return _stage(
        FinetuneConfig,
        settings,
        model=_source_model(config, source),
        data=distilled_dir(config),
        output=drafter_dir(config, drafter),
        response_field=field,
        num_speculative_tokens=config.num_speculative_tokens,
    )


def eval_config(config: PipelineConfig, drafter: str = "sd2") -> EvalConfig:
    """The eval of ``drafter`` against the target on the eval prompts, into ``eval/<drafter>/``."""
    return _stage(
        EvalConfig,
        config.eval,
        target=config.target,
        drafter=drafter_dir(config, drafter),
        prompts=config.eval_prompts,
        output=storage.join(eval_root(config), drafter, "report.json"),
        num_speculative_tokens=config.num_speculative_tokens,
    )


def serve_config(config: PipelineConfig, drafter: str = "sd2") -> ServeConfig:
    """The target served with ``drafter``."""
    return _stage(
        ServeConfig,
        config.serve,
        target=config.target,
        drafter=drafter_dir(config, drafter),
        num_speculative_tokens=config.num_speculative_tokens,
    )


def tune_config(config: PipelineConfig) -> TuneConfig:
    """The search over the run's target, drafter and distilled rows, into ``tune/``."""
    if config.tune is None:
        raise ConfigError("tune: the pipeline config has no tune section")
    return _stage(
        TuneConfig,
        config.tune,
        target=config.target,
        drafter=config.drafter,
        data=distilled_dir(config),
        eval_prompts=config.eval_prompts,
        output=out(config, "tune"),
        num_speculative_tokens=config.num_speculative_tokens,
    )


# a stage's section -> its config as `sd2 run` builds it (the SD² drafter's, where it matters)
STAGE_CONFIGS: dict[str, Callable[[PipelineConfig], StageConfig]] = {
    "distill": distill_config,
    "prune": prune_config,
    "finetune": finetune_config,
    "eval": eval_config,
    "serve": serve_config,
    "tune": tune_config,
}


def stage_from_pipeline(path: str, stage: str, overrides: dict[str, Any]) -> StageConfig:
    """``sd2 <stage> --config pipeline.yaml [key=value ...]``: the stage as ``sd2 run`` would run
    it (the SD² drafter's), then the command line's overrides on top."""
    from sd2_ray.config import set_dotted

    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"{path}: a pipeline config has no stage '{stage}' (one of {', '.join(STAGE_CONFIGS)})")
    config = with_kit_paths(PipelineConfig.load(path)).with_cluster_placement()
    built = STAGE_CONFIGS[stage](config)
    if not overrides:
        return built
    data = built.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return validate(type(built), data, source=path)
