"""Test helper: DeepSpeed on N CPU ranks (gloo) without Ray, and the fine-tune scenario the GPU
configs run: bf16 + ZeRO-3 + gradient checkpointing + the chunked LM-head loss, a ZeRO
checkpoint saved after step 2 and restored into a fresh engine, then the gathered HF save.

``run_ranks`` spawns the ranks (each one a fresh process, as Ray Train's workers are) and
returns what every rank returned; ``restore_scenario`` is the per-rank body, also run by
``bench/gpu_smoke.py`` on a GPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd2_ray.finetune.worker_config import WorkerConfig


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed
    import torch

    torch.set_num_threads(1)
    # a rank stuck in a collective the other skipped fails in a minute, not gloo's 30
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=90))
    result = fn(rank, world, *args)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned CPU ranks; their JSON-able results."""
    import torch.multiprocessing as mp

    from sd2_ray.finetune.extensions import extensions_dir
    from sd2_ray.serve.http import free_port

    extensions_dir()  # the venv's prebuilt DeepSpeed CPU op, inherited by the ranks
    with tempfile.TemporaryDirectory(prefix="sd2-ranks-") as out_dir:
        mp.spawn(_rank_main, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def _steps(
    engine, rows: list[dict], tokenizer, worker: WorkerConfig, rank: int, world: int, first: int, last: int
) -> list:
    from sd2_ray.finetune.step import train_step

    size = worker.batch_size
    return [
        train_step(engine, rows[i * size : (i + 1) * size], tokenizer, worker, rank, world)["loss"]
        for i in range(first, last)
    ]


def _fresh_engine(worker: WorkerConfig, device):
    from sd2_ray.finetune import masking, session

    model, tokenizer, masks = session.load_drafter(worker, device)
    loaded = str(next(model.parameters()).dtype)  # before DeepSpeed casts anything
    masking.register_gradient_masks(model, masks)
    engine, _ = session.build_engine(model, worker)
    return engine, tokenizer, masks, loaded


def _count_without_gathering(engine, masks: dict, poke: bool = False) -> tuple[int, int]:
    """(masked nonzeros, ZeRO-3 gathers made to count them). With ``poke`` each rank first sets
    one masked weight of its own partition nonzero, so the count must equal the world size."""
    import deepspeed
    import torch

    named = dict(engine.module.lm.named_parameters())
    if poke:
        key = next(iter(masks))
        param, keep = named[key], masks[key]
        local = param.ds_tensor.view(-1)
        start = local.numel() * torch.distributed.get_rank(group=param.ds_process_group)
        masked = (~keep.flat(start, min(local.numel(), param.ds_numel - start))).nonzero()
        with torch.no_grad():
            local[int(masked[0])] = 1.0
    original, calls = deepspeed.zero.GatheredParameters, []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    deepspeed.zero.GatheredParameters = spy
    try:
        from sd2_ray.finetune import masking

        return masking.count_masked_nonzero(engine.module.lm, masks), len(calls)
    finally:
        deepspeed.zero.GatheredParameters = original


def restore_scenario(
    rank: int, world: int, worker: WorkerConfig, rows: list[dict], out: str, device: str = "cpu"
) -> dict:
    """Run A trains steps 1-4, saving a ZeRO checkpoint after step 2; run B is a fresh engine
    restored from it that trains steps 3-4; B then writes the gathered HF model dir to ``out``.
    Returns both runs' losses, the masked nonzeros (counted without gathering) and dtypes."""
    import torch

    from sd2_ray.finetune import session
    from sd2_ray.finetune.train_state import TrainState

    torch.manual_seed(worker.seed)
    on = torch.device(device)
    engine, tokenizer, masks, loaded = _fresh_engine(worker, on)
    checkpoint = os.path.join(out, "ckpt")
    uninterrupted = _steps(engine, rows, tokenizer, worker, rank, world, 0, 2)
    session.save_state(engine, checkpoint, TrainState(step=2, step_in_epoch=2), rank)
    uninterrupted += _steps(engine, rows, tokenizer, worker, rank, world, 2, 4)
    del engine
    restored_engine, tokenizer, masks, _ = _fresh_engine(worker, on)
    state = session.load_state(restored_engine, checkpoint)
    restored = _steps(restored_engine, rows, tokenizer, worker, rank, world, state.step, 4)
    nonzero, gathers = _count_without_gathering(restored_engine, masks)
    session.save_hf(restored_engine, tokenizer, os.path.join(out, "model"), rank)
    poked, _ = _count_without_gathering(restored_engine, masks, poke=True)
    return {
        "gathers_to_count": gathers,
        "poked_count": poked,
        "uninterrupted": uninterrupted,
        "restored": restored,
        "masked_nonzero": nonzero,
        "loaded_dtype": loaded,
        "mask_bytes": sum(m.nbytes for m in masks.values()),
        "masked_numel": sum(m.numel() for m in masks.values()),
        "restored_step": state.step,
    }
