"""``sd2 run``: the SD² pipeline as one job, with the paper's baselines side by side.

Reads top to bottom: distill, prune (the sparse drafter and the layer baseline), fine-tune every
drafter that needs it, evaluate all of them on the same prompts and K, search (only with
``run_tune``), report, serve the SD² pair once. Every stage's config comes from :mod:`sd2_ray.pipeline.chain`
(the one place that decides where artifacts live) and every stage skips an output whose
manifest is complete, so rerunning after a crash resumes at the stage that failed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sd2_ray import manifest, runtime, storage
from sd2_ray.kit import with_kit_paths
from sd2_ray.pipeline.chain import (
    FINETUNED,
    distill_config,
    drafter_dir,
    eval_config,
    eval_root,
    finetune_config,
    layer_prune_config,
    out,
    prune_config,
    pruned_dir,
    serve_config,
    tune_config,
)
from sd2_ray.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)
STAGE = "run"


INPUT_FIELDS = ("target", "drafter", "uag_drafter", "train_prompts", "eval_prompts")


def resolved(config: PipelineConfig) -> PipelineConfig:
    """The run's config as every node must see it: kit parts built (and, for an s3:// output,
    published under OUTPUT/kit/ so that other nodes read them from there, not from this
    machine's cache) and each stage placed on its node type (from the cluster file)."""
    config = with_kit_paths(config).with_cluster_placement()  # the CLI may have resolved kit: already
    kit_fields = [f for f in INPUT_FIELDS if is_kit_part(getattr(config, f))]
    if kit_fields and storage.is_s3(config.output):
        config = config.model_copy(update={f: publish_kit_part(config, getattr(config, f)) for f in kit_fields})
    return config


def is_kit_part(path: str | None) -> bool:
    """A local path inside the built kit (its cache, or $SD2_KIT_DIR)."""
    import os

    if not path or storage.is_s3(path):
        return False
    roots = [os.path.join(storage.cache_root(), "kit"), os.environ.get("SD2_KIT_DIR") or ""]
    return any(root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep) for root in roots)


def publish_kit_part(config: PipelineConfig, local: str) -> str:
    """Copy one built kit part (a model dir or a prompt file) under OUTPUT/kit/<kit hash>/, once."""
    import os

    dst = out(config, "kit", os.path.basename(os.path.dirname(local)), os.path.basename(local))
    done = dst + ".published"
    if not storage.exists(done):
        if os.path.isdir(local):
            storage.copy_dir(local, dst)
        else:
            storage.write_bytes(dst, storage.read_bytes(local))
        storage.write_text(done, local)
    return dst


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = resolved(config)
        self.timings: dict[str, float] = {}

    def timed(self, name: str, fn, *args, **kwargs):
        began = time.perf_counter()
        log.info("=== %s", name)
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - began, 2)
        return result

    def run(self) -> dict[str, Any]:
        from sd2_ray.runtime import declare_shared_storage, ensure_ray, require_reachable

        config = self.config
        if config.cluster:  # before anything is launched: a stage that cannot fit fails now, in one line
            from sd2_ray.plan.job import check

            check(config)
        ensure_ray()
        if config.shared_storage:
            declare_shared_storage()
        for field in ("output", *INPUT_FIELDS):  # before anything lands on one node's disk
            if getattr(config, field):
                require_reachable(getattr(config, field), field, shared=config.shared_storage)
        config.save(config.output)
        manifest.start(config.output, STAGE, drafters=config.drafter_names)
        try:
            self.timed("distill", self.distill)
            drafter_dirs = self.build_drafters()
            reports = self.timed("eval", self.evaluate, drafter_dirs)
            if config.run_tune:  # opt-in: a tune section alone configures `sd2 tune --config`
                self.timed("tune", self.tune)
            summary = self.timed("report", self.report, reports)
            if config.serve_smoke and "sd2" in drafter_dirs:
                summary["serve_smoke"] = self.timed("serve_smoke", self.serve_smoke)
        except BaseException as err:
            manifest.fail(config.output, STAGE, f"{type(err).__name__}: {err}", timings=self.timings)
            raise
        manifest.complete(config.output, STAGE, timings=self.timings, report=out(config, "report", "report.json"))
        return summary

    # -- stages -----------------------------------------------------------------------------
    def distill(self) -> None:
        from sd2_ray.distill.job import main as distill_main

        distill_main(distill_config(self.config))

    def build_drafters(self) -> dict[str, str]:
        """Prune and fine-tune what the requested drafters need; {drafter name: model dir}."""
        from sd2_ray.finetune.job import run_finetune
        from sd2_ray.prune.job import run_prune

        wanted = self.config.drafter_names
        if {"sd2", "sd2-kd", "sparse-sft", "layer-pruned-sd"} & set(wanted):
            self.timed("prune:sd2", run_prune, prune_config(self.config))
        if "layer-pruned-sd" in wanted:
            self.timed("prune:layers", run_prune, layer_prune_config(self.config, self.layer_drop()))
        for name in wanted:
            if name in FINETUNED:
                self.timed(f"finetune:{name}", run_finetune, finetune_config(self.config, name))
        return {name: drafter_dir(self.config, name) for name in wanted}

    def layer_drop(self) -> int:
        """Blocks the layer baseline drops: as configured, or (auto) the count whose MACs match the
        SD² drafter's; a finished baseline (reused on rerun) keeps the count it recorded."""
        from sd2_ray.prune.layers import matching_layer_drop

        if self.config.drop_layers != "auto":
            return self.config.drop_layers
        done = pruned_dir(self.config, "layers")
        record = manifest.read(done) if manifest.is_complete(done) else None
        if record is not None:
            return len(record["dropped_blocks"])
        return matching_layer_drop(self.config.drafter, pruned_dir(self.config, "sd2"))

    def evaluate(self, drafter_dirs: dict[str, str]) -> dict[str, dict[str, Any]]:
        from sd2_ray.evaluate.fanout import evaluate_drafters

        configs = {name: eval_config(self.config, name) for name in drafter_dirs}
        return evaluate_drafters(configs, eval_root(self.config))

    def tune(self) -> None:
        from sd2_ray.tune.job import main as tune_main

        tune_main(tune_config(self.config))

    def report(self, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from sd2_ray.pipeline.report import write_pipeline_report

        return write_pipeline_report(self.config, reports, out(self.config, "report"))

    def serve_smoke(self) -> dict[str, Any]:
        from sd2_ray.serve.smoke import serve_smoke

        result = serve_smoke(
            serve_config(self.config, "sd2"), self.config.eval_prompts, self.config.serve_smoke_timeout_s
        )
        storage.write_json(out(self.config, "serve_smoke.json"), result)
        return result


def main(config: PipelineConfig) -> dict[str, Any]:
    pipeline = Pipeline(config)
    summary = pipeline.run()
    runtime.disconnect_quietly()  # Ray's buffered worker lines come out now, before the summary
    print(summary.get("table", ""))
    print("\n| stage | seconds |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in pipeline.timings.items()))
    print(f"sd2 run: report at {storage.join(pipeline.config.output, 'report', 'report.md')}")
    return summary
