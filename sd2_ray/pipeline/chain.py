"""Where every stage of a run reads and writes: the one place that chains stage paths.

``sd2 run`` (:mod:`sd2_ray.pipeline.run`), ``sd2 <stage> --config pipeline.yaml`` and the
search all build their stage configs here, from the pipeline's run-wide fields and the stage's
typed settings section, so they can never disagree about where an artifact lives. Layout under
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

from typing import Any

from sd2_ray import storage
from sd2_ray.kit import with_kit_paths
from sd2_ray.pipeline.config import PipelineConfig

# fine-tuned drafter -> (the model it starts from, the column it learns)
FINETUNED = {
    "dense-sd": ("base", "response"),
    "layer-pruned-sd": ("layers", "response"),
    "sd2": ("sd2", "response"),
    "sd2-kd": ("sd2", "response"),
    "sparse-sft": ("sd2", "reference"),
}
# layer baseline settings taken from the prune section unless layer_prune sets them
INHERITED_PLACEMENT = ("device", "num_gpus", "num_cpus", "node_resources", "trust_remote_code")
STAGES = ("distill", "prune", "layer_prune", "finetune", "eval", "serve", "tune")


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
    return config.drafter if source == "base" else pruned_dir(config, source)


def _stage(cls, settings, **paths: Any):
    """A stage's full config: its section's settings plus the chained paths, validated."""
    from sd2_ray.config import validate

    return validate(cls, {**settings.model_dump(), **paths}, source=cls.__name__)


def chain(config: PipelineConfig, stage: str, drafter: str = "sd2", **extra: Any):
    """The full config of one ``stage`` of the run (``drafter`` picks which fine-tune, eval or
    served drafter; ``extra`` are fields the run decides, e.g. the layer baseline's block count)."""
    if stage == "distill":
        from sd2_ray.distill.config import DistillConfig

        return _stage(
            DistillConfig,
            config.distill,
            target=config.target,
            prompts=config.train_prompts,
            output=distilled_dir(config),
            **extra,
        )
    if stage == "prune":
        from sd2_ray.prune.config import PruneConfig

        return _stage(
            PruneConfig,
            config.prune,
            model=config.drafter,
            calibration=distilled_dir(config),
            output=pruned_dir(config, "sd2"),
            **extra,
        )
    if stage == "layer_prune":  # the run passes drop_layers (auto-matched to the SD² drafter's MACs)
        return _layer_prune(config, **extra)
    if stage == "finetune":
        from sd2_ray.finetune.config import FinetuneConfig

        source, field = FINETUNED[drafter]
        settings = config.kd_settings() if drafter == "sd2-kd" else config.finetune
        return _stage(
            FinetuneConfig,
            settings,
            model=_source_model(config, source),
            data=distilled_dir(config),
            output=drafter_dir(config, drafter),
            response_field=field,
            num_speculative_tokens=config.num_speculative_tokens,
            **extra,
        )
    if stage == "eval":
        from sd2_ray.evaluate.config import EvalConfig

        return _stage(
            EvalConfig,
            config.eval,
            target=config.target,
            drafter=drafter_dir(config, drafter),
            prompts=config.eval_prompts,
            output=storage.join(eval_root(config), drafter, "report.json"),
            num_speculative_tokens=config.num_speculative_tokens,
            **extra,
        )
    if stage == "serve":
        from sd2_ray.serve.config import ServeConfig

        return _stage(
            ServeConfig,
            config.serve,
            target=config.target,
            drafter=drafter_dir(config, drafter),
            num_speculative_tokens=config.num_speculative_tokens,
            **extra,
        )
    if stage == "tune":
        return _tune(config, **extra)
    raise ValueError(f"unknown stage '{stage}' (one of {', '.join(STAGES)})")


def _layer_prune(config: PipelineConfig, drop_layers: int, **extra: Any):
    from sd2_ray.prune.config import PruneConfig

    settings = config.layer_prune.model_dump()
    for key in INHERITED_PLACEMENT:
        if key not in config.layer_prune.model_fields_set:
            settings[key] = getattr(config.prune, key)
    from sd2_ray.config import validate

    return validate(
        PruneConfig,
        {
            **settings,
            "method": "layers",
            "drop_layers": drop_layers,
            "model": config.drafter,
            "calibration": distilled_dir(config),
            "output": pruned_dir(config, "layers"),
            **extra,
        },
        source="layer_prune",
    )


def _tune(config: PipelineConfig, **extra: Any):
    from sd2_ray.errors import ConfigError
    from sd2_ray.tune.config import TuneConfig

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
        **extra,
    )


def stage_from_pipeline(path: str, stage: str, overrides: dict[str, Any]):
    """``sd2 <stage> --config pipeline.yaml [key=value ...]``: the stage as ``sd2 run`` would run
    it (the SD² drafter's), then the command line's overrides on top."""
    from sd2_ray.config import set_dotted, validate

    config = with_kit_paths(PipelineConfig.load(path)).with_cluster_placement()
    built = chain(config, stage)
    if not overrides:
        return built
    data = built.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return validate(type(built), data, source=path)
