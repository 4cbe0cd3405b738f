"""The Ray Train adapter of ``sd2 finetune``: the dataset every worker streams, the TorchTrainer
(DeepSpeed inside each worker: :mod:`sd2_ray.finetune.ray_worker`, told everything by one
:class:`~sd2_ray.finetune.worker_config.WorkerConfig`), and the fit."""

from __future__ import annotations

import logging

from sd2_ray import storage
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.ray_worker import train_loop
from sd2_ray.finetune.worker_config import WorkerConfig

log = logging.getLogger(__name__)


def fit(config: FinetuneConfig, worker: WorkerConfig, files: list[str], callbacks: list | None):
    from sd2_ray.runtime import ensure_ray, require_reachable

    ensure_ray()
    require_reachable(config.output)
    require_reachable(config.checkpoint_root(), "storage_path")
    dataset = build_dataset(files)
    if not config.stream_data:
        # One parallel read for the whole run: otherwise every worker re-runs the read
        # pipeline (tasks, process start-up) every epoch, which dominates small runs.
        dataset = dataset.materialize()
    trainer = build_trainer(config, worker, dataset, callbacks)
    log.info(
        "finetune: %d workers, ZeRO-%d, %d steps, checkpoints in %s",
        config.workers,
        config.zero_stage,
        worker.total_steps,
        config.checkpoint_run_dir(),
    )
    return trainer.fit()


def build_dataset(files: list[str]):
    """Parquet files (the driver stages anything else as Parquet) as one ordered dataset."""
    import ray.data

    fs, _ = storage.filesystem(files[0])
    inner = [storage.filesystem(f)[1] for f in files]
    dataset = ray.data.read_parquet(inner, filesystem=fs)
    dataset.context.enable_progress_bars = False  # one bar per worker per epoch floods the driver log
    dataset.context.execution_options.preserve_order = True  # file order, whichever read ends first
    return dataset


def checkpoint_config(config: FinetuneConfig):
    """Keep the newest ``keep_checkpoints``; with held-out selection, the best-scored ones instead
    (Ray Train always keeps the latest too, which resumption needs), so the step the driver
    publishes is still there when training ends."""
    from ray.train import CheckpointConfig

    if not config.eval_every:
        return CheckpointConfig(num_to_keep=config.keep_checkpoints)
    from sd2_ray.finetune.heldout import SCORE_KEY

    return CheckpointConfig(
        num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
    )


def build_trainer(config: FinetuneConfig, worker: WorkerConfig, dataset, callbacks: list | None = None):
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = config.checkpoint_root()
    fs, inner = storage.filesystem(root)
    run_config = RunConfig(
        name=config.checkpoint_run_name(),
        storage_path=inner,
        storage_filesystem=fs if storage.is_s3(root) else None,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=checkpoint_config(config),
        callbacks=callbacks or None,
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=worker.to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **config.node_resources},
        ),
        torch_config=TorchConfig(backend=config.process_group_backend()),
        datasets={"train": dataset},
        # Not split: every worker streams the same seeded order and keeps its slice of each
        # global batch, which makes 1-vs-N runs and resumed runs see identical batches.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        run_config=run_config,
    )
