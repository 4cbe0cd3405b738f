"""The per-worker training loop run by Ray Train (a Ray adapter): setup, train, checkpoint, save.

Everything a worker needs arrives as one typed
:class:`~sd2_ray.finetune.worker_config.WorkerConfig` (built on the driver, sent as Ray Train's
``train_loop_config`` and validated back on arrival); nothing comes from module globals, so the
loop runs the same on a laptop and on a cluster. The step itself is pure torch + DeepSpeed
(:mod:`sd2_ray.finetune.step`, :mod:`sd2_ray.finetune.session`); this module adds Ray Train's
context, data shard, reports and checkpoints.

Data parity: every worker streams the same seeded order and takes its slice of each global
batch (:func:`sd2_ray.finetune.data.rank_slice`), and the loss is divided by the step's
token count over all workers, so 1 and N workers follow the same loss curve and a resumed
run skips exactly the batches it already trained on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from sd2_ray.finetune import heldout, masking, session
from sd2_ray.finetune.checkpoint import FINAL_CHECKPOINT, MODEL_SUBDIR, checkpoint_dir_name
from sd2_ray.finetune.collectives import engine_device
from sd2_ray.finetune.report_clock import report_due
from sd2_ray.finetune.step import train_step
from sd2_ray.finetune.train_state import TrainState
from sd2_ray.finetune.worker_config import WorkerConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- worker setup


def _resolve_model(path: str) -> str:
    """Local model dir; two workers on one node may download the same s3 copy at once."""
    from sd2_ray.models.io import resolve_model_dir

    for attempt in range(3):
        try:
            return resolve_model_dir(path)
        except OSError:
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def worker_device(worker: WorkerConfig) -> torch.device:
    """This worker's device: the GPU Ray Train assigned it (use_gpu), else the CPU."""
    if worker.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


# ---------------------------------------------------------------- data


def global_batches(shard, worker: WorkerConfig, epoch: int) -> Iterator[list[dict]]:
    """The epoch's global batches of rows, in the same seeded order on every worker."""
    buffer = max(worker.shuffle_buffer, worker.batch_size) if worker.shuffle_buffer else None
    for batch in shard.iter_batches(
        batch_size=worker.batch_size,
        batch_format="pyarrow",
        drop_last=True,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=worker.seed + epoch if buffer else None,
    ):
        yield batch.to_pylist()


def heldout_batches(worker: WorkerConfig, tokenizer, rank: int, world: int) -> list[tuple[dict, bool]]:
    """The held-out rows the driver staged (``eval_data``), this rank's share, encoded once."""
    if not worker.eval_every or not worker.eval_data:
        return []
    from sd2_ray import storage

    rows = storage.read_parquet(worker.eval_data).to_pylist()
    return heldout.heldout_batches(rows, tokenizer, worker, rank, world)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(engine, state: TrainState, metrics: dict, rank: int) -> None:
    """Every rank saves its DeepSpeed shard; Ray Train merges the ranks' dirs in storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sd2-ckpt-") as tmp:
        session.save_state(engine, tmp, state, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )


def restore(engine, checkpoint) -> TrainState:
    with checkpoint.as_directory() as directory:
        return session.load_state(engine, directory)


def save_final(engine, tokenizer, state: TrainState, metrics: dict, rank: int) -> None:
    """Rank 0 writes the HF model dir (ZeRO-3 partitions gathered module by module) into the
    last checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sd2-final-") as tmp:
        session.save_hf(engine, tokenizer, os.path.join(tmp, MODEL_SUBDIR), rank)
        checkpoint = None
        if rank == 0:
            state.save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=FINAL_CHECKPOINT)


# ---------------------------------------------------------------- the loop


def _progress(total: int, done: int, rank: int):
    """Rank 0's step bar, drawn by the driver (Ray's tqdm for remote workers)."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="finetune")
    bar.update(done)
    return bar


def worker_start(loop_config: dict[str, Any]):
    """(worker config, rank, world, checkpoint to restore or None), with the worker's environment,
    threads and seed set; None when the run finished before a restart (the final checkpoint is
    the result)."""
    import ray.train

    worker = WorkerConfig.from_loop_config(loop_config)
    for key, value in worker.env.items():
        os.environ.setdefault(key, value)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(worker.cpus_per_worker)))
    torch.manual_seed(worker.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and checkpoint.path.rstrip("/").endswith("/" + FINAL_CHECKPOINT):
        return None
    return worker, ctx.get_world_rank(), ctx.get_world_size(), checkpoint


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (``loop_config``: :meth:`WorkerConfig.to_loop_config`)."""
    import ray.train

    started = worker_start(loop_config)
    if started is None:
        return
    worker, rank, world, checkpoint = started
    device = worker_device(worker)
    model, tokenizer, masks = session.load_drafter(worker, device, _resolve_model(worker.model))
    if worker.enforce_masks:
        masking.register_gradient_masks(model, masks)  # before deepspeed.initialize (see masking)
    engine, _ = session.build_engine(model, worker)
    state = restore(engine, checkpoint) if checkpoint is not None else TrainState()
    if state.restarts:
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch, state.step_in_epoch)
    evals = heldout_batches(worker, tokenizer, rank, world)
    shard = ray.train.get_dataset_shard("train")

    def step(rows: list[dict]) -> dict:
        return train_step(engine, rows, tokenizer, worker, rank, world)

    metrics = train_epochs(
        engine, state, worker, lambda epoch: global_batches(shard, worker, epoch), step, evals, masks, rank, world
    )
    metrics = dict(metrics, masked_nonzero=masking.count_masked_nonzero(engine.module.lm, masks), final=True)
    state.finished = True
    if rank == 0 and state.history:
        state.history[-1]["masked_nonzero"] = metrics["masked_nonzero"]
    save_final(engine, tokenizer, state, scored(metrics, state, worker), rank)


def train_epochs(
    engine,
    state: TrainState,
    worker: WorkerConfig,
    batches,
    step,
    evals: list,
    masks: dict,
    rank: int,
    world: int,
    evaluate=heldout.evaluate,
) -> dict[str, Any]:
    """The epochs from where ``state`` stands: ``batches(epoch)`` yields each epoch's batches of
    rows, ``step(rows)`` trains on one and returns its metrics; batches trained on before a
    restart are skipped. Returns the last step's metrics."""
    total = worker.total_steps
    metrics: dict[str, Any] = {}
    bar = _progress(total, state.step, rank)
    last_report = time.monotonic()
    while state.step < total and state.epoch < worker.epochs:
        for index, rows in enumerate(batches(state.epoch)):
            if index < state.step_in_epoch:
                continue  # trained on before the restart
            if state.step >= total:
                break
            metrics = step(rows)
            state.step += 1
            state.step_in_epoch += 1
            # drafters: every worker sees the global batch; feature heads: each its own split of it
            state.samples += len(rows) * (world if worker.feature_head is not None else 1)
            if bar is not None:
                bar.update(1)
                bar.set_description(f"finetune loss {metrics['loss']:.4f}")
            metrics.update(
                step=state.step,
                epoch=state.epoch,
                samples=state.samples,
                restarts=state.restarts,
                wall_time=time.time(),
            )
            if after_step(engine, state, metrics, evals, masks, worker, rank, world, last_report, evaluate):
                last_report = time.monotonic()
        else:
            state.epoch += 1
            state.step_in_epoch = 0
            continue
        break
    if bar is not None:
        bar.close()
    return metrics


def after_step(
    engine,
    state: TrainState,
    metrics: dict,
    evals: list,
    masks: dict,
    worker: WorkerConfig,
    rank: int,
    world: int,
    last_report: float,
    evaluate=heldout.evaluate,
) -> bool:
    """Held-out eval when due (``evaluate(engine, evals, worker)``: the drafter's, or a feature
    head's), then history, checkpoint and report; True when it reported. Every rank takes the
    same branches (evals, checkpoints and reports are collectives)."""
    import ray.train

    total = worker.total_steps
    evaluated = bool(evals) and heldout.eval_due(worker.eval_every, state.step, total)
    improved = False
    if evaluated:
        metrics.update(evaluate(engine, evals, worker))
        improved = heldout.update_best(state, metrics, worker.select_by)
        metrics["best_step"] = state.best["step"] if state.best else None
    due = state.step < total and (state.step % worker.checkpoint_every == 0 or improved)
    if due:
        metrics["masked_nonzero"] = masking.count_masked_nonzero(engine.module.lm, masks)
    if rank == 0:
        state.history.append(dict(metrics))
    if due:
        save_checkpoint(engine, state, scored(metrics, state, worker), rank)
    elif (evaluated and state.step < total) or report_due(
        worker.report_every, worker.report_interval_s, state.step, total, last_report, world, engine_device(engine)
    ):
        ray.train.report(metrics)
    else:
        return False
    return True


def scored(metrics: dict, state: TrainState, worker: WorkerConfig) -> dict:
    """A checkpoint's metrics with the score Ray Train ranks it by when a selection is made."""
    if not worker.eval_every:
        return metrics
    return dict(metrics, **{heldout.SCORE_KEY: heldout.checkpoint_score(state, worker.select_by)})
