"""The per-worker training loop run by Ray Train: setup, train, checkpoint, save.

Everything a worker needs arrives in one plain ``dict`` (``train_loop_config``), built by
:func:`sd2_ray.finetune.trainer.loop_config`; nothing comes from module globals, so the
loop runs the same on a laptop and on a cluster. Ray and DeepSpeed are imported inside
functions; the schedule and DeepSpeed-config helpers at the top are pure.

Data parity: every worker streams the same seeded order and takes its slice of each global
batch (:func:`sd2_ray.finetune.data.rank_slice`), and the loss is divided by the step's
token count over all workers, so 1 and N workers follow the same loss curve and a resumed
run skips exactly the batches it already trained on.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune import masking

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
DS_TAG = "ds"
MODEL_SUBDIR = "model"
FINAL_CHECKPOINT = "final"


# ---------------------------------------------------------------- pure helpers

def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def merge_dicts(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def fill_deepspeed_config(base: dict, *, zero_stage: int, batch_size: int, micro_batch: int,
                          grad_accum: int, grad_clip: float | None, optimizer: str, lr: float,
                          weight_decay: float, overrides: dict | None = None) -> dict:
    """A complete DeepSpeed config: the template's ``"auto"`` values filled from our config."""
    ds = merge_dicts(base, overrides or {})
    ds["train_batch_size"] = batch_size
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = float(grad_clip or 0.0)
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage
    if optimizer == "deepspeed_adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                       "betas": [0.9, 0.999], "eps": 1e-8}}
    else:
        ds.pop("optimizer", None)
    ds.pop("scheduler", None)  # the client cosine schedule is the one that is checkpointed
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a restart continues, not restarts."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    step_in_epoch: int = 0   # global batches of this epoch already trained on
    samples: int = 0         # rows consumed over all workers
    finished: bool = False
    restarts: int = 0        # how many times this run resumed from a checkpoint
    history: list[dict] = field(default_factory=list)  # per-step metrics (rank 0)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: str) -> "TrainState":
        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))


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


def load_drafter(cfg: dict):
    """Model in train mode, tokenizer, and masks with the masked weights zeroed."""
    from sd2_ray.models.io import load_model, load_tokenizer

    local = _resolve_model(cfg["model"])
    model = load_model(local).train()
    tokenizer = load_tokenizer(local)
    masks = masking.prepare_masks(local, model, source=cfg["model"])
    return model, tokenizer, masks


def build_engine(model: torch.nn.Module, cfg: dict):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    def schedule(optimizer):
        return LambdaLR(optimizer, lambda s: lr_factor(s, cfg["warmup_steps"], cfg["total_steps"],
                                                       cfg["scheduler"], cfg["min_lr_ratio"]))

    groups = param_groups(model, cfg["weight_decay"])
    optimizer = None
    if cfg["optimizer"] == "torch_adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        lr_scheduler=schedule, config=cfg["deepspeed_config"])
    return engine, scheduler


# ---------------------------------------------------------------- data

def global_batches(shard, cfg: dict, epoch: int) -> Iterator[list[dict]]:
    """The epoch's global batches of rows, in the same seeded order on every worker."""
    buffer = max(cfg["shuffle_buffer"], cfg["batch_size"]) if cfg["shuffle_buffer"] else None
    for batch in shard.iter_batches(batch_size=cfg["batch_size"], batch_format="pyarrow", drop_last=True,
                                    local_shuffle_buffer_size=buffer,
                                    local_shuffle_seed=cfg["seed"] + epoch if buffer else None):
        yield batch.to_pylist()


# ---------------------------------------------------------------- one step

def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_step(engine, rows: list[dict], tokenizer, cfg: dict, rank: int, world: int) -> dict:
    """One optimizer step on this worker's slice of a global batch; metrics over all workers."""
    start = time.perf_counter()
    mine = D.rank_slice(rows, rank, world)
    micro = [D.collate(D.encode_rows(chunk, tokenizer, cfg["seq_len"], cfg["response_field"]),
                       tokenizer.pad_token_id)
             for chunk in D.micro_batches(mine, cfg["grad_accum"])]
    local_labels = sum(D.labelled_tokens(b["labels"]) for b in micro)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    step_labels, _ = _all_reduce([local_labels, local_tokens])
    # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
    # the mean over every labelled token of the global batch.
    scale = world * cfg["grad_accum"] / max(step_labels, 1.0)
    lr = engine.get_lr()[0]
    loss_sum = 0.0
    for batch in micro:
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        summed = D.token_loss_sum(out.logits, batch["labels"])
        engine.backward(summed * scale)
        engine.step()
        loss_sum += summed.item()
    total_loss, total_labels, total_tokens = _all_reduce([loss_sum, local_labels, local_tokens])
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / max(total_labels, 1.0), "lr": lr, "tokens": int(total_tokens),
            "loss_tokens": int(total_labels), "step_time_s": elapsed,
            "tokens_per_s": total_tokens / elapsed if elapsed > 0 else 0.0}


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(engine, state: TrainState, metrics: dict, rank: int) -> None:
    """Every rank saves its DeepSpeed shard; Ray Train merges the ranks' dirs in storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sd2-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if rank == 0:
            state.save(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{state.step:07d}")


def restore(engine, checkpoint) -> TrainState:
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        state = TrainState.load(directory)
    state.restarts += 1
    return state


def save_final(engine, tokenizer, state: TrainState, metrics: dict, rank: int) -> None:
    """Rank 0 writes the HF model dir (ZeRO-3 partitions gathered first) into the last checkpoint."""
    import ray.train

    model = engine.module
    with tempfile.TemporaryDirectory(prefix="sd2-final-") as tmp:
        with masking._gathered(list(model.parameters())):
            if rank == 0:
                model.save_pretrained(os.path.join(tmp, MODEL_SUBDIR), safe_serialization=True)
        checkpoint = None
        if rank == 0:
            tokenizer.save_pretrained(os.path.join(tmp, MODEL_SUBDIR))
            state.save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=FINAL_CHECKPOINT)


def _maybe_fail(cfg: dict, state: TrainState, rank: int, world: int) -> None:
    """Test hook: raise once, on the last rank, after step N (a marker file makes it once)."""
    fail = cfg.get("fail_once")
    if not fail or state.step != fail["step"] or rank != world - 1 or os.path.exists(fail["marker"]):
        return
    with open(fail["marker"], "w") as f:
        f.write(str(state.step))
    raise RuntimeError(f"injected worker failure after step {state.step}")


# ---------------------------------------------------------------- the loop

def _progress(total: int, done: int, rank: int):
    """Rank 0's step bar, drawn by the driver (Ray's tqdm for remote workers)."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="finetune")
    bar.update(done)
    return bar


def report_due(cfg: dict, step: int, total: int, last_report: float, world: int) -> bool:
    """Whether this step's metrics go to Ray Train. Every rank must decide alike (a report is a
    collective), so the time gate is agreed on: rank 0's clock decides for everyone."""
    if step % cfg["report_every"] or step >= total:
        return False
    interval = cfg.get("report_interval_s", 0.0)
    if not interval:
        return True
    elapsed = time.monotonic() - last_report
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            flag = torch.tensor([1.0 if elapsed >= interval else 0.0], dtype=torch.float64)
            dist.broadcast(flag, src=0)
            return bool(flag.item())
    return elapsed >= interval


def train_loop(cfg: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train

    for key, value in cfg.get("env", {}).items():
        os.environ.setdefault(key, value)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    torch.manual_seed(cfg["seed"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and checkpoint.path.rstrip("/").endswith("/" + FINAL_CHECKPOINT):
        return  # finished before a restart: the final checkpoint is the result
    model, tokenizer, masks = load_drafter(cfg)
    if cfg["enforce_masks"]:
        masking.register_gradient_masks(model, masks)  # before deepspeed.initialize (see masking)
    engine, _ = build_engine(model, cfg)
    state = restore(engine, checkpoint) if checkpoint is not None else TrainState()
    if state.restarts:
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch,
                 state.step_in_epoch)
    shard = ray.train.get_dataset_shard("train")
    total = cfg["total_steps"]
    metrics: dict[str, Any] = {}
    bar = _progress(total, state.step, rank)
    last_report = time.monotonic()
    while state.step < total and state.epoch < cfg["epochs"]:
        for index, rows in enumerate(global_batches(shard, cfg, state.epoch)):
            if index < state.step_in_epoch:
                continue  # trained on before the restart
            if state.step >= total:
                break
            metrics = train_step(engine, rows, tokenizer, cfg, rank, world)
            state.step += 1
            state.step_in_epoch += 1
            state.samples += len(rows)
            if bar is not None:
                bar.update(1)
                bar.set_description(f"finetune loss {metrics['loss']:.4f}")
            metrics.update(step=state.step, epoch=state.epoch, samples=state.samples,
                           restarts=state.restarts, wall_time=time.time())
            due = state.step % cfg["checkpoint_every"] == 0 and state.step < total
            if due:
                metrics["masked_nonzero"] = masking.count_masked_nonzero(engine.module, masks)
            if rank == 0:
                state.history.append(dict(metrics))
            if due:
                save_checkpoint(engine, state, metrics, rank)
                last_report = time.monotonic()
            elif report_due(cfg, state.step, total, last_report, world):
                ray.train.report(metrics)
                last_report = time.monotonic()
            _maybe_fail(cfg, state, rank, world)
        else:
            state.epoch += 1
            state.step_in_epoch = 0
            continue
        break
    if bar is not None:
        bar.close()
    metrics = dict(metrics, masked_nonzero=masking.count_masked_nonzero(engine.module, masks), final=True)
    state.finished = True
    if rank == 0 and state.history:
        state.history[-1]["masked_nonzero"] = metrics["masked_nonzero"]
    save_final(engine, tokenizer, state, metrics, rank)
