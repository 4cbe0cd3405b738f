"""One fine-tuning step and its pieces, as plain torch + DeepSpeed (no Ray): the schedule, the
DeepSpeed config, the loss module DeepSpeed wraps, and the step itself.

Devices: everything a step creates (batches, the counts it all-reduces, masks it compares) is
made on the engine's device. Under NCCL a collective on a CPU tensor fails ("No backend type
associated with device type cpu"), and a CPU batch fed to a CUDA model fails in the embedding.

Memory: :class:`CausalLMLoss` never materialises full-vocabulary fp32 logits for the whole
batch. It runs the decoder, then the LM head and the loss over chunks of positions, each chunk
recomputed in the backward pass (activation checkpointing), so the logits held at any moment
are ``chunk x vocab`` (a 128k vocabulary at 2048 positions would otherwise be 1 GB per row).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune.acceptance import acceptance_sums
from sd2_ray.finetune.losses import LossSpec, LossSums, loss_sum

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATE_FILE = "train_state.json"


# ---------------------------------------------------------------- schedule and DeepSpeed config


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


def zero_template(stage: int) -> dict:
    """The package's DeepSpeed ZeRO-``stage`` template (``sd2_ray/finetune/deepspeed/``)."""
    text = resources.files("sd2_ray.finetune").joinpath("deepspeed").joinpath(f"zero{stage}.json").read_text()
    return json.loads(text)


def fill_deepspeed_config(
    base: dict,
    *,
    zero_stage: int,
    batch_size: int,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float | None,
    optimizer: str,
    lr: float,
    weight_decay: float,
    overrides: dict | None = None,
) -> dict:
    """A complete DeepSpeed config: the template's ``"auto"`` values filled from our config."""
    ds = merge_dicts(base, overrides or {})
    ds["train_batch_size"] = batch_size
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = float(grad_clip or 0.0)
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage
    if optimizer == "deepspeed_adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    else:
        ds.pop("optimizer", None)
    ds.pop("scheduler", None)  # the client cosine schedule is the one that is checkpointed
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a restart continues, not restarts."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # global batches of this epoch already trained on
    samples: int = 0  # rows consumed over all workers
    finished: bool = False
    restarts: int = 0  # how many times this run resumed from a checkpoint
    history: list[dict] = field(default_factory=list)  # per-step metrics (rank 0)
    best: dict | None = None  # held-out selection: {"step", "metric", "value"} of the best eval so far

    def save(self, directory: str) -> None:
        import os

        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: str) -> TrainState:
        import os

        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))


# ---------------------------------------------------------------- the loss module


class CausalLMLoss(torch.nn.Module):
    """What DeepSpeed trains: the HF causal LM (``.lm``, saved as the drafter) behind a forward
    that returns the configured loss (:class:`~sd2_ray.finetune.losses.LossSpec`: cross-entropy
    or a divergence to the target's stored top-k) *summed* over the labelled positions.

    The decoder runs once; the LM head and the loss run per chunk of labelled positions under
    activation checkpointing (:func:`sd2_ray.finetune.losses.loss_sum`). Models whose logits are
    post-processed (soft-capping, a logit scale) use their own forward instead, unchunked, so
    the loss is always the model's. The step reads the sums behind the returned total (ce and
    divergence apart) from ``last``; with ``acceptance_k`` the forward also scores the
    teacher-forced acceptance of the same positions into ``last_acceptance`` (held-out evals)."""

    def __init__(self, lm: PreTrainedModel, spec: LossSpec | None = None):
        super().__init__()
        self.lm = lm
        self.spec = spec or LossSpec()
        self.last: LossSums | None = None  # of the latest forward
        self.last_acceptance: dict[str, float] | None = None
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        special = any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale"))
        self.chunked = not special and hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        topk_mask: torch.Tensor | None = None,
        acceptance_k: int = 0,
    ) -> torch.Tensor:
        batch = {"labels": labels, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "topk_mask": topk_mask}
        if self.chunked:
            outputs = self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            head = self.lm.get_output_embeddings()
        else:
            outputs = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            head = None
        self.last = sums = loss_sum(outputs, batch, self.spec, head)
        if acceptance_k:
            self.last_acceptance = acceptance_sums(
                outputs, batch, acceptance_k, self.spec.temperature, self.spec.chunk_tokens, head
            )
        return sums.total


# ---------------------------------------------------------------- one step


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks, on ``device`` (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def engine_device(engine) -> torch.device:
    """Where the engine's model computes (``engine.device`` for DeepSpeed engines)."""
    device = getattr(engine, "device", None)
    if device is not None:
        return torch.device(device)
    return next(engine.parameters()).device


def encode_batches(rows: Sequence[dict], tokenizer, cfg: dict, count: int) -> list[dict[str, torch.Tensor]]:
    """``rows`` as ``count`` collated micro-batches (the target's ids and top-k with use_response_ids)."""
    return [
        D.collate(
            D.encode_rows(
                chunk, tokenizer, cfg["seq_len"], cfg["response_field"], use_ids=cfg.get("use_response_ids", False)
            ),
            tokenizer.pad_token_id,
        )
        for chunk in D.micro_batches(rows, count)
    ]


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, rows: list[dict], tokenizer, cfg: dict, rank: int, world: int) -> dict:
    """One optimizer step on this worker's slice of a global batch; metrics over all workers:
    ``loss`` (the optimised total per labelled token), ``ce`` (cross-entropy per labelled token)
    and, for a divergence loss, ``kd`` (divergence per position with the target's top-k)."""
    start = time.perf_counter()
    device = engine_device(engine)
    micro = encode_batches(D.rank_slice(rows, rank, world), tokenizer, cfg, cfg["grad_accum"])
    local_labels = sum(D.labelled_tokens(b["labels"]) for b in micro)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    step_labels, _ = all_reduce([local_labels, local_tokens], device)
    # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
    # the mean over every labelled token of the global batch.
    scale = world * cfg["grad_accum"] / max(step_labels, 1.0)
    lr = engine.get_lr()[0]
    sums = [0.0, 0.0, 0.0, 0.0]  # total, ce, kd, kd positions
    for batch in micro:
        summed = engine(**on_device(batch, device))
        engine.backward(summed * scale)
        engine.step()
        last = engine.module.last
        sums = [a + b for a, b in zip(sums, (summed.item(), last.ce, last.kd, last.kd_tokens), strict=True)]
    total, ce, kd, kd_tokens, labels, tokens = all_reduce([*sums, local_labels, local_tokens], device)
    elapsed = time.perf_counter() - start
    out = {
        "loss": total / max(labels, 1.0),
        "ce": ce / max(labels, 1.0),
        "lr": lr,
        "tokens": int(tokens),
        "loss_tokens": int(labels),
        "step_time_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    if engine.module.spec.needs_topk and kd_tokens:
        out.update(kd=kd / kd_tokens, kd_tokens=int(kd_tokens))
    return out


def report_due(cfg: dict, step: int, total: int, last_report: float, world: int, device: torch.device) -> bool:
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
            flag = torch.tensor([1.0 if elapsed >= interval else 0.0], dtype=torch.float64, device=device)
            dist.broadcast(flag, src=0)
            return bool(flag.item())
    return elapsed >= interval
