"""``sd2 run``: the SD² pipeline as one job, with the paper's baselines side by side.

Layout under ``output`` (local or s3://), one manifest per stage output::

    distilled/                     the target's own answers to the train prompts
    pruned/sd2/  pruned/layers/    SparseGPT (or the configured method) drafter; layer-pruned baseline
    drafters/{dense-sd,layer-pruned-sd,sd2,sparse-sft}/   fine-tuned drafters
    eval/target-only.json          target-only decoding of the eval prompts (measured once)
    eval/<drafter>/report.json     one eval per drafter, same prompts and K
    report/report.json, report.md, mal_vs_macs.png, acceptance_by_position.png
    tune/                          when the config has a `tune` section
    serve_smoke.json               one request through the served SD² pair

Every stage skips an output whose manifest is complete, so rerunning after a crash resumes at
the stage that failed.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.pipeline_config import KIT_PREFIX, PipelineConfig

log = logging.getLogger(__name__)
STAGE = "run"
FINETUNED = {"dense-sd": ("base", "response"), "layer-pruned-sd": ("layers", "response"),
             "sd2": ("sd2", "response"), "sparse-sft": ("sd2", "reference")}


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.out = config.output
        self.timings: dict[str, float] = {}
        self.paths = resolve_paths(config)

    def path(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def timed(self, name: str, fn, *args, **kwargs):
        began = time.perf_counter()
        log.info("=== %s", name)
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - began, 2)
        return result

    def run(self) -> dict[str, Any]:
        from sd2_ray.runtime import ensure_ray

        ensure_ray()
        self.config.save(self.out)
        manifest.start(self.out, STAGE, drafters=self.config.drafters)
        try:
            self.timed("distill", self.distill)
            drafter_dirs = self.build_drafters()
            reports = self.timed("eval", self.evaluate, drafter_dirs)
            if self.config.tune is not None:
                self.timed("tune", self.tune)
            summary = self.timed("report", self.report, reports)
            if self.config.serve_smoke and "sd2" in drafter_dirs:
                summary["serve_smoke"] = self.timed("serve_smoke", self.serve_smoke, drafter_dirs["sd2"])
        except BaseException as err:
            manifest.fail(self.out, STAGE, f"{type(err).__name__}: {err}", timings=self.timings)
            raise
        manifest.complete(self.out, STAGE, timings=self.timings, report=self.path("report", "report.json"))
        return summary

    # -- stages -----------------------------------------------------------------------------
    def distill(self) -> None:
        from sd2_ray.distill.job import main as distill_main

        distill_main(self.config.stage("distill", **stage_fields(self.config, self.paths, "distill")))

    def prune(self, name: str, section: str, **extra: Any) -> str:
        from sd2_ray.prune.job import run_prune

        out = self.path("pruned", name)
        self.timed(f"prune:{name}", run_prune, self.config.stage(
            section, model=self.paths["drafter"], calibration=self.path("distilled"), output=out, **extra))
        return out

    def finetune(self, name: str, model: str, response_field: str) -> str:
        from sd2_ray.finetune.trainer import run_finetune

        out = self.path("drafters", name)
        self.timed(f"finetune:{name}", run_finetune, self.config.stage(
            "finetune", model=model, data=self.path("distilled"), output=out, response_field=response_field))
        return out

    def build_drafters(self) -> dict[str, str]:
        """Prune and fine-tune what the requested drafters need; {drafter name: model dir}."""
        wanted = self.config.drafters
        sources = {"base": self.paths["drafter"]}
        if {"sd2", "sparse-sft", "layer-pruned-sd"} & set(wanted):
            sources["sd2"] = self.prune("sd2", "prune")
        if "layer-pruned-sd" in wanted:
            drop = self.config.drop_layers
            if drop == "auto":
                drop = self.auto_layer_drop(sources["sd2"])
            sources["layers"] = self.prune("layers", "layer_prune", method="layers", drop_layers=drop,
                                           sparsity=None, pattern="unstructured")
        dirs = {"dense": self.paths["drafter"]}
        for name in wanted:
            if name in FINETUNED:
                source, field = FINETUNED[name]
                dirs[name] = self.finetune(name, sources[source], field)
        if "uag" in wanted:
            dirs["uag"] = self.paths["uag_drafter"]
        return {name: dirs[name] for name in wanted}

    def auto_layer_drop(self, sparse_dir: str) -> int:
        """Blocks the layer baseline drops to match the SD² drafter's MACs; a finished baseline
        (reused on rerun) keeps the count it recorded, without loading the models again."""
        done = self.path("pruned", "layers")
        if manifest.is_complete(done):
            return len(manifest.read(done)["dropped_blocks"])
        return matching_layer_drop(self.paths["drafter"], sparse_dir)

    def evaluate(self, drafter_dirs: dict[str, str]) -> dict[str, dict[str, Any]]:
        from sd2_ray.pipeline_eval import evaluate_drafters

        return evaluate_drafters(self.config, self.paths, drafter_dirs, self.path("eval"))

    def tune(self) -> None:
        from sd2_ray.tune.job import main as tune_main

        tune_main(self.config.stage("tune", **stage_fields(self.config, self.paths, "tune")))

    def report(self, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from sd2_ray.pipeline_report import write_pipeline_report

        return write_pipeline_report(self.config, reports, self.path("report"))

    def serve_smoke(self, drafter_dir: str) -> dict[str, Any]:
        from sd2_ray.pipeline_eval import serve_smoke

        result = serve_smoke(self.config, self.paths["target"], drafter_dir, self.paths["eval_prompts"])
        storage.write_json(self.path("serve_smoke.json"), result)
        return result


def resolve_paths(config: PipelineConfig) -> dict[str, str]:
    """Model and prompt paths with ``kit:`` names replaced by the built (cached) kit's parts."""
    named = {"target": config.target, "drafter": config.drafter, "uag_drafter": config.uag_drafter,
             "train_prompts": config.train_prompts, "eval_prompts": config.eval_prompts}
    if not config.uses_kit():
        return {k: v for k, v in named.items() if v}
    from sd2_ray.kit import ensure_kit, kit_paths

    parts = kit_paths(ensure_kit(**config.kit))
    resolved = {}
    for key, value in named.items():
        if value and value.startswith(KIT_PREFIX):
            part = value[len(KIT_PREFIX):]
            if part not in parts:
                raise_config(f"field '{key}': unknown kit part '{part}' (one of {', '.join(parts)})")
            resolved[key] = parts[part]
        elif value:
            resolved[key] = value
    return resolved


def raise_config(message: str) -> None:
    from sd2_ray.errors import ConfigError

    raise ConfigError(message)


def matching_layer_drop(dense_dir: str, sparse_dir: str) -> int:
    """Blocks to drop from the dense drafter so its MACs come closest to the sparse drafter's."""
    from sd2_ray.models.io import load_model
    from sd2_ray.models.macs import linear_macs

    dense = linear_macs(load_model(dense_dir))
    sparse_macs = linear_macs(load_model(sparse_dir))["macs"]
    layers = _num_layers(dense_dir)
    per_block = dense["blocks_dense_macs"] / layers
    best = min(range(1, layers), key=lambda n: abs(dense["dense_macs"] - n * per_block - sparse_macs),
               default=1)
    log.info("layer baseline: dropping %d of %d blocks (sparse drafter %d MACs, dense %d, per block %d)",
             best, layers, sparse_macs, dense["dense_macs"], per_block)
    return best


def _num_layers(model_dir: str) -> int:
    from transformers import AutoConfig

    from sd2_ray.models.io import model_metadata_dir

    return int(AutoConfig.from_pretrained(model_metadata_dir(model_dir)).num_hidden_layers)  # no weights


def stage_fields(config: PipelineConfig, paths: dict[str, str], section: str) -> dict[str, Any]:
    """The chained fields of one stage on the SD² path, as the pipeline sets them; also what a
    single-stage command (`sd2 prune --config pipeline.yaml`) uses, so both agree."""
    out = lambda *parts: storage.join(config.output, *parts)  # noqa: E731
    k = config.num_speculative_tokens
    fields = {
        "distill": {"target": paths["target"], "prompts": paths["train_prompts"], "output": out("distilled")},
        "prune": {"model": paths["drafter"], "calibration": out("distilled"), "output": out("pruned", "sd2")},
        "finetune": {"model": out("pruned", "sd2"), "data": out("distilled"), "output": out("drafters", "sd2")},
        "eval": {"target": paths["target"], "drafter": out("drafters", "sd2"), "prompts": paths["eval_prompts"],
                 "output": out("eval", "sd2", "report.json"), "num_speculative_tokens": k},
        "serve": {"target": paths["target"], "drafter": out("drafters", "sd2"), "num_speculative_tokens": k},
        "tune": {"target": paths["target"], "drafter": paths["drafter"], "data": out("distilled"),
                 "eval_prompts": paths["eval_prompts"], "output": out("tune"), "num_speculative_tokens": k},
    }
    return fields[section]


def main(config: PipelineConfig) -> dict[str, Any]:
    summary = Pipeline(config).run()
    print(summary.get("table", ""))
    print(f"sd2 run: report at {storage.join(config.output, 'report', 'report.md')}")
    return summary


def single_stage_config(path: str, section: str, overrides: dict[str, Any]):
    """A stage's config from a pipeline YAML: its section plus the pipeline's chained paths."""
    config = PipelineConfig.load(path)
    chained = stage_fields(config, resolve_paths(config), section)
    return config.stage(section, **{**chained, **overrides})


__all__ = ["Pipeline", "main", "matching_layer_drop", "resolve_paths", "single_stage_config", "stage_fields"]
