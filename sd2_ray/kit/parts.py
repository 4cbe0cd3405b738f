"""The kit's trained models ("parts"): each trained once per setting and cached by its own hash,
and trained side by side: the first model in this process while the others train in one child
process, each on ``num_threads`` threads. A model's weights depend only on its seeds and thread
count, so a side-by-side build gives the same bytes as one model after another, in about the
target's time instead of the sum (the deep drafter's pretraining is as long as the target's).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sd2_ray.kit.config import KitConfig
from sd2_ray.kit.shapes import Shape

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class Job:
    index: int  # seeds: init = seed*1000 + index, data = seed*1000 + 100 + index
    name: str
    shape: Shape
    tokenizer: Any  # a transformers tokenizer
    streams: list[list[int]]
    shares: list[float]
    steps: int


def train_all(config: KitConfig, jobs: list[Job]) -> tuple[dict[str, tuple[PreTrainedModel, dict]], float]:
    """{name: (model, training record)} for every job, and the CPU seconds spent in the child."""
    import concurrent.futures
    import multiprocessing
    import tempfile

    pending = [j for j in jobs[1:] if not (config.reuse_trained and is_cached(config, j.name))]
    if not pending:
        return {j.name: trained_model(config, j) for j in jobs}, 0.0
    with tempfile.TemporaryDirectory(prefix=".kit-parts-") as scratch:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            child = pool.submit(_train_in_child, config.to_dict(), pending, scratch)
            results = {jobs[0].name: trained_model(config, jobs[0])}
            records, child_cpu = child.result()
        for job in jobs[1:]:
            results[job.name] = (
                (_load(os.path.join(scratch, job.name)), records[job.name])
                if job.name in records
                else trained_model(config, job)
            )
    return {j.name: results[j.name] for j in jobs}, child_cpu


def _train_in_child(config_dict: dict, jobs: list[Job], scratch: str) -> tuple[dict[str, dict], float]:
    import torch

    started = time.process_time()
    config = KitConfig.model_validate(config_dict)
    torch.set_num_threads(config.num_threads)
    records = {}
    for job in jobs:
        model, records[job.name] = trained_model(config, job)
        model.save_pretrained(os.path.join(scratch, job.name), safe_serialization=True)
    return records, time.process_time() - started


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def is_cached(config: KitConfig, name: str) -> bool:
    from sd2_ray.kit.cache import part_location

    return os.path.isfile(os.path.join(part_location(config, name), "part.json"))


def trained_model(config: KitConfig, job: Job) -> tuple[PreTrainedModel, dict]:
    """Train one model, or load it from the per-model cache when identical settings trained it
    before (training is deterministic, so the weights are the same either way)."""
    import shutil
    import tempfile

    from sd2_ray.kit import training
    from sd2_ray.kit.cache import part_location

    part = part_location(config, job.name)
    if config.reuse_trained and is_cached(config, job.name):
        log.info("kit %s: reusing the trained model in %s", job.name, part)
        with open(os.path.join(part, "part.json")) as f:
            trained = json.load(f)
        return _load(part), {**trained, "reused": True}
    model = training.build_model(job.shape, job.tokenizer, seed=config.seed * 1000 + job.index)
    sampler = training.WindowSampler(
        job.streams, job.shares, config.seq_len, config.batch_size, seed=config.seed * 1000 + 100 + job.index
    )
    started, started_cpu = time.time(), time.process_time()
    losses = training.train(model, sampler, job.steps, config.lr, job.name)
    trained = {
        "steps": job.steps,
        "train_seconds": round(time.time() - started, 1),
        "train_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
    }
    os.makedirs(os.path.dirname(part), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".part-", dir=os.path.dirname(part))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "part.json"), "w") as f:
            json.dump(trained, f)
        if not os.path.isdir(part):
            os.replace(tmp, part)  # whole or absent: part.json is inside
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, trained
