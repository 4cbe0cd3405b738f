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
    if config.feature_head is not None:
        datasets = feature_datasets(config, worker, dataset)
    elif not config.stream_data:
        # One parallel read for the whole run: otherwise every worker re-runs the read
        # pipeline (tasks, process start-up) every epoch, which dominates small runs.
        datasets = {"train": dataset.materialize()}
    else:
        datasets = {"train": dataset}
    trainer = build_trainer(config, worker, datasets, callbacks)
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
    dataset.context.print_on_execution_start = False  # and so does a plan per worker per epoch
    dataset.context.execution_options.preserve_order = True  # file order, whichever read ends first
    return dataset


def feature_datasets(config: FinetuneConfig, worker: WorkerConfig, rows) -> dict:
    """A feature head's datasets: ``train``, the target's features streamed from ``rows`` by the
    actor pool (split over the workers), and ``eval``, the held-out rows' features computed once."""
    from sd2_ray.feature.stream import feature_dataset, warn_if_cpus_run_short

    head = config.feature_head
    assert head is not None
    warn_if_cpus_run_short(config.workers * config.cpus_per_worker, head.stream)
    extract = extract_settings(config, worker, head).as_dict()
    out = {"train": feature_dataset(rows, config.model, head.stream, extract)}
    if head.stream.materialize:
        out["train"] = out["train"].materialize()
    if worker.eval_data:
        held = build_dataset([worker.eval_data])
        # computed once here: an unsplit dataset would run its own actor pool in every worker
        uncached = head.stream.model_copy(update={"cache": None})
        out["eval"] = feature_dataset(held, config.model, uncached, extract).materialize()
    return out


def extract_settings(config: FinetuneConfig, worker: WorkerConfig, head):
    """What the feature actors compute: the head's layers of the target, the rows encoded as the
    fine-tune encodes them."""
    from transformers import AutoConfig

    from sd2_ray.feature.extract import ExtractSettings
    from sd2_ray.models.io import model_metadata_dir

    target = AutoConfig.from_pretrained(model_metadata_dir(config.model))
    text = target.get_text_config() if hasattr(target, "get_text_config") else target
    return ExtractSettings(
        layers=head.feature_layers(text.num_hidden_layers),
        seq_len=config.seq_len,
        response_field=config.response_field,
        use_response_ids=worker.use_response_ids,
        device="cuda" if head.stream.gpus_per_actor else "cpu",
        torch_threads=max(1, int(head.stream.cpus_per_actor)),
    )


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


def build_trainer(config: FinetuneConfig, worker: WorkerConfig, datasets: dict, callbacks: list | None = None):
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
    loop, split = train_loop, []
    if config.feature_head is not None:
        from sd2_ray.feature.ray_worker import train_loop as feature_loop

        # each row's features are computed once: every worker gets its own part of the stream
        loop, split = feature_loop, ["train"]
    elif config.massv is not None:
        from sd2_ray.vision.ray_worker import train_loop as massv_loop

        loop = massv_loop
    return TorchTrainer(
        loop,
        train_loop_config=worker.to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **config.node_resources},
        ),
        torch_config=TorchConfig(backend=config.process_group_backend()),
        datasets=datasets,
        # Drafters' rows are not split: every worker streams the same seeded order and keeps its
        # slice of each global batch, which makes 1-vs-N runs and resumed runs see identical batches.
        dataset_config=DataConfig(datasets_to_split=split, execution_options=ExecutionOptions(preserve_order=True)),
        run_config=run_config,
    )
