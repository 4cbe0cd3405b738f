"""The decode loop's forward passes over a :class:`StaticKV`, eager or compiled.

Two callables per model, each one traceable (no host reads, fixed control flow):
- :func:`draft_chain`: the drafter's K steps (its pending chunk, then K-1 single tokens, a
  pick after each) as one call, so a compiled chain has one guard check and no sync per K
  tokens;
- :func:`chunk_logits`: one forward of a chunk (the target's verification of pending + K
  drafts, or a single target-only step).
With ``compile=True`` the steady-state shapes (drafter chunk 2, verification K+1, target-only
step 1) run compiled; the first pass of a batch (prompt prefill, any width) always runs
eagerly. On the CPU the compiler is ``torch.compile`` (inductor); on CUDA it is
``torch.compile(mode="reduce-overhead")``, which captures a CUDA graph per batch size the
loop meets: UNTESTED here (no GPU on the machines this was written on).
A compiler failure is logged once and the steps fall back to eager.
"""

from __future__ import annotations

import logging

import torch

from sd2_ray.specdec.sampling import RowParams, fit_vocab, pick
from sd2_ray.specdec.static_kv import StaticKV

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs per step function: batch sizes x sampling modes x cache sizes


def chunk_logits(kv: StaticKV, tokens: torch.Tensor, real: torch.Tensor, keep: int) -> torch.Tensor:
    return kv.run(tokens, real, keep)


def draft_chain(
    kv, tokens: torch.Tensor, real: torch.Tensor, k: int, rp: RowParams, uniforms: torch.Tensor, vocab: int
):
    """``k`` drafts per row: the right-aligned chunk, then k-1 single tokens (the last draft is
    fed next pass only if it gets accepted). Returns (drafts (B, k), warped probabilities
    (B, k, V) or None when every row is greedy)."""
    logits = kv.run(tokens, real, 1)[:, -1]
    one = torch.ones_like(real[:, -1:])  # every row takes one more token
    drafts, probs = [], []
    for j in range(k):
        token, prob = pick(fit_vocab(logits, vocab), rp, uniforms[:, j])
        drafts.append(token)
        probs.append(prob)
        if j < k - 1:
            logits = kv.run(token.unsqueeze(1), one, 1)[:, -1]
    return torch.stack(drafts, dim=1), None if probs[0] is None else torch.stack(probs, dim=1)


def mark_batch_dynamic(args) -> None:
    """Declare the batch dimension of every tensor a step reads as dynamic, so one graph serves
    the batch as rows finish (else the first size is compiled, then a dynamic graph on the
    first change). A batch of 1 still gets its own graph (the compiler specializes sizes 0/1)."""
    import torch._dynamo

    tensors: list[torch.Tensor | None] = []
    for arg in args:
        if isinstance(arg, StaticKV):
            tensors += [arg.lengths] + [t for layer in arg.cache.slot_layers for t in (layer.keys, layer.values)]
        elif isinstance(arg, RowParams):
            tensors += [arg.greedy, arg.temperature, arg.top_k, arg.top_p]
        elif isinstance(arg, torch.Tensor):
            tensors.append(arg)
    for t in tensors:
        if t is not None and t.dim() and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _compiler(fn, device: torch.device):
    import os

    import torch._dynamo

    from sd2_ray.storage import cache_root

    # compiled kernels persist with the model kit, not under a per-job TMPDIR: a later process
    # (the next eval, Tune trial or replica) then compiles in seconds instead of minutes
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root(), "inductor"))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if device.type == "cuda":
        # CUDA graphs (cudagraph trees): one graph per batch size, replayed without launches
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    return torch.compile(fn)


class DecodeSteps:
    """The forward passes of one model, compiled for steady-state shapes when ``compile``."""

    def __init__(self, model, compile: bool = False):
        from sd2_ray.models.device import input_device

        self.device = input_device(model)
        self.compiled = compile
        self._chunk = _compiler(chunk_logits, self.device) if compile else None
        self._chain = _compiler(draft_chain, self.device) if compile else None

    def logits(self, kv, tokens: torch.Tensor, real: torch.Tensor, keep: int, steady: bool = False):
        """Logits of the last ``keep`` columns of a right-aligned chunk, on ``kv.device``."""
        if not isinstance(kv, StaticKV):
            return kv.forward(tokens, real, keep)
        tokens, real = tokens.to(kv.device), real.to(kv.device)
        kv.reserve(tokens.shape[1])
        return self._call(self._chunk if steady else None, chunk_logits, kv, tokens, real, keep).to(kv.device)

    def draft(
        self,
        kv,
        tokens: torch.Tensor,
        real: torch.Tensor,
        k: int,
        rp: RowParams,
        uniforms: torch.Tensor,
        vocab: int,
        steady: bool = False,
    ):
        """:func:`draft_chain` on ``kv.device`` (tokens, rp and uniforms already there)."""
        if not isinstance(kv, StaticKV):
            return draft_chain(kv, tokens, real, k, rp, uniforms, vocab)
        kv.reserve(tokens.shape[1] + k - 1)
        return self._call(self._chain if steady else None, draft_chain, kv, tokens, real, k, rp, uniforms, vocab)

    def _call(self, compiled, eager, *args):
        if compiled is None:
            return eager(*args)
        from torch._dynamo.exc import TorchDynamoException

        if self.device.type != "cuda":
            mark_batch_dynamic(args)
        try:
            out = compiled(*args)
        except TorchDynamoException as err:  # a compiler that cannot run here: stay correct, eagerly
            logger.warning("torch.compile failed (%s); decoding eagerly from now on", err)
            self._chunk = self._chain = None
            return eager(*args)
        if self.device.type == "cuda":  # a CUDA graph's outputs are overwritten by its next replay
            out = tuple(t.clone() if t is not None else None for t in out) if isinstance(out, tuple) else out.clone()
        return out
