"""Fine-tuning losses for a drafter (pure torch): ``ce | fkl | rkl | jsd | tvd``.

``ce`` is next-token cross-entropy on the distilled tokens (SD²'s loss). The others match the
drafter's distribution q to the target's p (DistillSpec): forward KL(p‖q), reverse KL(q‖p),
Jensen-Shannon (β = ½) and total variation ½Σ|p − q| (= 1 − the per-token acceptance
Σ min(p, q) of speculative sampling, so minimising it maximises acceptance).

**Support.** Distillation stores the target's top-k log-probabilities per response token (at
temperature 1, see :mod:`sd2_ray.distill.scoring`). Both distributions are compared on those k
ids plus one *rest* bucket holding the remaining mass: for the target 1 − Σ its top-k probs,
for the drafter 1 − Σ its probs on the same ids (computed as a log-sum-exp over the other ids,
so it stays exact when the top-k hold nearly everything). With k = vocabulary size the rest is
empty and every divergence equals the dense one exactly.

**Temperature.** ``temperature`` is the serving temperature T: both distributions are compared
as they are sampled at serving, q_T = softmax(z/T) (the drafter's full logits, exact) and
p_T ∝ p^{1/T} (from the stored temperature-1 log-probs: exact on the top-k ids up to the
normaliser). The target's rest mass at T is estimated as if it were r/p_k tokens of
probability p_k (r = rest mass at 1, p_k = the smallest stored prob): exact at T = 1 and for
k = vocab; for T < 1 an upper bound on the true rest mass. T = 0 (greedy serving) compares the
distributions at T = 1: greedy acceptance is argmax(q) == argmax(p), which no temperature
makes differentiable, and the temperature-1 divergences are the smooth surrogates DistillSpec
uses for greedy decoding (their minimum, q = p, has the same argmax).

Every loss is **summed** over labelled positions like :func:`sd2_ray.finetune.data.token_loss_sum`
(the caller divides by the step's labelled-token count), and computed in chunks of
``chunk_tokens`` positions under activation checkpointing, so the fp32 full-vocabulary
log-softmax exists for one chunk at a time, in the forward and in the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["ce", "fkl", "rkl", "jsd", "tvd"]
LOSSES: tuple[str, ...] = ("ce", "fkl", "rkl", "jsd", "tvd")
IGNORE_INDEX = -100
# Log-probabilities below this are zero mass: a finite floor keeps 0 · log 0 terms (and their
# gradients) at 0 instead of NaN.
LOG_FLOOR = -1.0e4
# Target rest mass below this is float32 round-off of top-k probs summing to one, not mass.
REST_EPS = 1.0e-6
TOPK_KEYS = ("topk_ids", "topk_logprobs", "topk_mask")


@dataclass(frozen=True)
class LossSpec:
    """Which loss, and how: built from the fine-tune config with :meth:`from_config`."""

    kind: LossKind = "ce"
    ce_weight: float = 0.0  # cross-entropy added to a divergence: total = kd + ce_weight * ce
    temperature: float = 0.0  # the serving temperature; 0 = greedy (compared at 1)
    chunk_tokens: int = 1024  # labelled positions per chunk

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss '{self.kind}' (one of {', '.join(LOSSES)})")

    @classmethod
    def from_config(cls, config) -> LossSpec:
        """From a :class:`~sd2_ray.finetune.config.FinetuneSettings` or the workers' copy of it
        (:class:`~sd2_ray.finetune.worker_config.WorkerConfig`)."""
        return cls(
            kind=config.loss,
            ce_weight=config.ce_weight,
            temperature=config.kd_temperature,
            chunk_tokens=config.loss_chunk_tokens,
        )

    @property
    def needs_topk(self) -> bool:
        return self.kind != "ce"

    @property
    def compare_temperature(self) -> float:
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class LossSums:
    """Sums over one micro-batch's labelled positions. ``total`` carries the gradient."""

    total: torch.Tensor
    ce: float  # cross-entropy sum over every labelled position
    kd: float  # divergence sum over the labelled positions that have the target's top-k
    ce_tokens: int
    kd_tokens: int


# ---------------------------------------------------------------- distributions on the support


def target_log_probs(topk_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(n, k) stored temperature-1 log-probs -> (n, k+1) log-probs at ``temperature`` on the
    top-k ids plus the rest bucket (last column). See the module doc for the rest estimate."""
    lp = topk_logprobs.float().clamp(min=LOG_FLOOR)
    rest = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
    log_rest = torch.where(rest > REST_EPS, rest.clamp(min=REST_EPS).log(), torch.full_like(rest, LOG_FLOOR))
    if temperature == 1.0:
        return torch.cat([lp, log_rest.unsqueeze(-1)], dim=-1)
    inv = 1.0 / temperature
    smallest = lp.min(dim=-1).values
    log_rest_t = torch.where(rest > REST_EPS, log_rest + (inv - 1.0) * smallest, log_rest)
    scaled = torch.cat([lp * inv, log_rest_t.unsqueeze(-1)], dim=-1)
    return (scaled - scaled.logsumexp(-1, keepdim=True)).clamp(min=LOG_FLOOR)


def drafter_log_probs(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(n, V) drafter logits -> (n, k+1) log-probs at ``temperature`` on ``topk_ids`` (n, k)
    plus the mass of every other id (last column), exact."""
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = logq.gather(-1, topk_ids)
    others = logq.scatter(-1, topk_ids, torch.finfo(logq.dtype).min)
    rest = others.logsumexp(-1, keepdim=True).clamp(min=LOG_FLOOR)
    return torch.cat([top, rest], dim=-1)


def divergence(kind: str, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row divergence between target ``logp`` and drafter ``logq`` (same support, last dim)."""
    p, q = logp.exp(), logq.exp()
    if kind == "fkl":
        return (p * (logp - logq)).sum(-1)
    if kind == "rkl":
        return (q * (logq - logp)).sum(-1)
    if kind == "jsd":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"no divergence for loss '{kind}'")


# ---------------------------------------------------------------- positions and chunks


@dataclass
class Positions:
    """The labelled positions of a batch after the next-token shift, flattened."""

    rows: torch.Tensor  # (n,) row of the (B*L, V) logits / (B*L, H) hidden view predicting each label
    labels: torch.Tensor  # (n,) the label ids
    has_topk: torch.Tensor  # (n,) bool: the target's top-k is stored for this position
    topk_ids: torch.Tensor | None  # (n, k)
    topk_logprobs: torch.Tensor | None  # (n, k)


def labelled_positions(labels: torch.Tensor, batch: dict) -> Positions:
    """Logit row t of sequence b predicts token t+1: positions where labels[b, t+1] != -100."""
    length = labels.shape[1]
    valid = labels[:, 1:] != IGNORE_INDEX
    b, t = valid.nonzero(as_tuple=True)
    rows = b * length + t
    target_labels = labels[b, t + 1]
    if batch.get("topk_ids") is None:
        return Positions(rows, target_labels, torch.zeros_like(rows, dtype=torch.bool), None, None)
    ids = batch["topk_ids"].to(labels.device)[b, t + 1]
    logprobs = batch["topk_logprobs"].to(labels.device)[b, t + 1]
    return Positions(rows, target_labels, batch["topk_mask"].to(labels.device)[b, t + 1], ids, logprobs)


def position_logits(flat: torch.Tensor, rows: torch.Tensor, head: torch.nn.Module | None) -> torch.Tensor:
    """fp32 logits at ``rows`` of ``flat``: (N, V) logits, or (N, H) hidden states that the LM
    ``head`` turns into logits here, for these rows only."""
    picked = flat.index_select(0, rows)
    return (picked if head is None else head(picked)).float()


def chunk_starts(count: int, chunk_tokens: int, head: torch.nn.Module | None, device: torch.device) -> range:
    """First positions of the loss's chunks. Under ZeRO-3 every call of the LM head gathers its
    partitioned weight (a collective, again when backward recomputes the chunk), so every rank
    must make as many calls: a rank with fewer labelled positions runs empty chunks up to the
    largest count of any rank (a rank that stopped early leaves the others waiting forever)."""
    chunks = -(-count // chunk_tokens)
    if head is not None and any(hasattr(p, "ds_id") for p in head.parameters()):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor([chunks], dtype=torch.int64, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            chunks = int(agreed.item())
    return range(0, chunks * chunk_tokens, chunk_tokens)


def _chunk_sums(
    flat: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    has_topk: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    kind: str,
    temperature: float,
    head: torch.nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce sum, divergence sum) of one chunk; its logits and fp32 log-softmax live only in here."""
    logits = position_logits(flat, rows, head)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if kind == "ce" or topk_ids is None or not bool(has_topk.any()):
        return ce, logits.new_zeros(())
    assert topk_logprobs is not None, "top-k ids come with their log-probs"
    logits, ids, lp = logits[has_topk], topk_ids[has_topk].long(), topk_logprobs[has_topk]
    logp = target_log_probs(lp, temperature)
    logq = drafter_log_probs(logits, ids, temperature)
    return ce, divergence(kind, logp, logq).sum()


def loss_sum(outputs: torch.Tensor, batch: dict, spec: LossSpec, head: torch.nn.Module | None = None) -> LossSums:
    """The configured loss summed over the batch's labelled positions.

    ``outputs``: the model's (B, L, V) logits, or with ``head`` (the LM head) the decoder's
    (B, L, H) last hidden states: then logits are computed only at the labelled positions, one
    chunk at a time (and again in backward), so no (B, L, V) tensor ever exists.
    ``batch``: :func:`sd2_ray.finetune.data.collate`'s dict (``labels``; ``topk_ids`` /
    ``topk_logprobs`` / ``topk_mask`` when the rows have them).
    ``ce``: cross-entropy over every labelled position. Divergences: over the labelled positions
    with a stored top-k (a row without one, e.g. a rewrite that kept the reference answer,
    adds only its ``ce_weight`` cross-entropy), plus ``ce_weight`` × cross-entropy.
    """
    labels = batch["labels"].to(outputs.device)
    pos = labelled_positions(labels, batch)
    flat = outputs.reshape(-1, outputs.shape[-1])  # a view: outputs are contiguous
    temperature = spec.compare_temperature
    grad = torch.is_grad_enabled() and outputs.requires_grad
    ce_total = outputs.new_zeros((), dtype=torch.float32)
    kd_total = outputs.new_zeros((), dtype=torch.float32)
    for start in chunk_starts(pos.rows.numel(), spec.chunk_tokens, head, flat.device):
        part = slice(start, start + spec.chunk_tokens)
        args = (
            flat,
            pos.rows[part],
            pos.labels[part],
            pos.has_topk[part],
            None if pos.topk_ids is None else pos.topk_ids[part],
            None if pos.topk_logprobs is None else pos.topk_logprobs[part],
            spec.kind,
            temperature,
            head,
        )
        if grad:  # recomputed in backward: one chunk's fp32 vocab tensors alive at a time
            from torch.utils.checkpoint import checkpoint

            ce, kd = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_sums(*args)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    total = ce_total if spec.kind == "ce" else kd_total + spec.ce_weight * ce_total
    return LossSums(
        total=total,
        ce=float(ce_total.detach()),
        kd=float(kd_total.detach()),
        ce_tokens=int(pos.rows.numel()),
        kd_tokens=int(pos.has_topk.sum()),
    )
