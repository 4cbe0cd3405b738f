"""The lossless speculative decoding engine: batched chain drafting + verification (pure torch).

One loop serves three cases: target-only decoding (no drafter: K = 0, the speedup baseline and
target-only serving), a drafter that shares the target's tokenizer, and a drafter with another
tokenizer (Universal Assisted Generation, :mod:`sd2_ray.specdec.uag`). Every target forward
is a verification pass: the first one verifies drafts made right after the prompt, so with
drafter == target every pass commits K+1 tokens.

Per step, for the rows still running: the drafter proposes up to K target ids per row; the
target scores ``[uncached committed tokens, drafts]`` in one forward on its KV cache; each row
accepts its own prefix (greedy: equal to the target's argmax; sampling: min(1, p/q) with the
residual resample and bonus token); the caches roll rejected drafts back by length (static
caches, :mod:`sd2_ray.specdec.static_kv`) or turn them into holes (growing caches,
:mod:`sd2_ray.specdec.kv`), so nothing is ever recomputed. After the first pass every chunk
has a fixed shape (drafter: 2 tokens, target: K+1), which is what lets the draft chain and the
verification run compiled (:mod:`sd2_ray.specdec.steps`).

Devices: every tensor of the loop lives on the target's input device; the drafter works on its
own device (it may be another GPU) and hands drafts and probabilities back on the target's.
Per-request generators stay on the CPU, so a seed gives the same draws on any device.
"""

from __future__ import annotations

import logging

import torch

from sd2_ray.models.device import input_device
from sd2_ray.specdec.kv import RaggedKV, right_aligned
from sd2_ray.specdec.rows import Row, row_uniforms
from sd2_ray.specdec.sampling import RowParams, verify
from sd2_ray.specdec.static_kv import StaticKV, round_capacity, supports_static
from sd2_ray.specdec.steps import DecodeSteps
from sd2_ray.specdec.types import GenerationRequest, GenerationResult, TokenCallback

logger = logging.getLogger(__name__)

STEADY_DRAFT_CHUNK = 2  # what the drafter is fed after the first pass: [last draft,] bonus token


def eos_ids_of(model, tokenizer=None) -> tuple[int, ...]:
    """EOS ids from the generation config, the model config and the tokenizer (any of them)."""
    from sd2_ray.models.tokens import eos_token_ids

    return tuple(eos_token_ids(model, tokenizer))


def output_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class SameVocabDrafter:
    """Chain drafting with a drafter that shares the target's token ids.

    With ``steps`` over a static cache (``capacity`` given), the K draft steps after the first
    pass are one call of the same shape every pass (a chunk of 2: the bonus token, preceded
    by the last draft when all were accepted), so a compiled chain is reused."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        vocab: int,
        out_device=None,
        *,
        steps: DecodeSteps | None = None,
        capacity: int | None = None,
    ):
        self.steps = steps or DecodeSteps(model)
        self.kv = (
            StaticKV(model, len(prompts), capacity, fixed_width=self.steps.compiled)
            if capacity is not None
            else RaggedKV(model, len(prompts))
        )
        self.device = self.kv.device  # the drafter's own device
        self.out_device = out_device if out_device is not None else self.device  # the target's
        self.vocab = vocab
        self.pending: list[list[int]] = [list(p) for p in prompts]  # committed ids not in the cache
        self.last_draft: torch.Tensor | None = None
        self.steady = False  # past the first pass (the prompts)

    def propose(self, k: int, rp: RowParams, uniforms: torch.Tensor, history=None):
        steady = self.steady and max(len(p) for p in self.pending) <= STEADY_DRAFT_CHUNK
        tokens, real = right_aligned(self.pending, self.device, STEADY_DRAFT_CHUNK if steady else None)
        drafts, probs = self.steps.draft(
            self.kv, tokens, real, k, rp.to(self.device), uniforms.to(self.device), self.vocab, steady
        )
        self.steady = True
        self.last_draft = drafts[:, -1]
        self.pending = [[] for _ in self.pending]
        draft_len = torch.full((drafts.shape[0],), k, dtype=torch.long, device=self.out_device)
        return drafts.to(self.out_device), draft_len, None if probs is None else probs.to(self.out_device)

    def commit(self, k: int, accepted: list[int], next_tokens: list[int], new_tokens=None, history=None):
        if k == 0:
            for pending, token in zip(self.pending, next_tokens, strict=True):
                pending.append(token)
            return
        self.kv.drop_last(torch.tensor([k - 1 - min(a, k - 1) for a in accepted], dtype=torch.long, device=self.device))
        assert self.last_draft is not None  # set by propose, which a commit of k > 0 drafts follows
        last = self.last_draft.tolist()
        self.pending = [
            ([last[i]] if a == k else []) + [t] for i, (a, t) in enumerate(zip(accepted, next_tokens, strict=True))
        ]

    def select(self, rows: list[int]) -> None:
        self.kv.select(torch.tensor(rows, dtype=torch.long, device=self.device))
        self.pending = [self.pending[i] for i in rows]


class SpeculativeEngine:
    """Lossless batched speculative decoding for any Hugging Face causal LM pair.

    ``drafter_model=None`` decodes with the target alone through the same batched loop.
    Tokenizers, when both are given and differ, switch to Universal Assisted Generation.

    ``static_cache`` (default): preallocated KV caches rolled back by length
    (:mod:`sd2_ray.specdec.static_kv`); ``False``: the growing caches with holes of
    :mod:`sd2_ray.specdec.kv`. ``compile``: run the steady-state draft chain and verification
    compiled (:mod:`sd2_ray.specdec.steps`; static cache only). Off by default: on the CPUs
    this was measured on, compiling costs far more than short runs save (see bench_specdec).
    The cross-tokenizer drafter always keeps the growing cache (its context, in its own
    tokens, has no length known in advance) and runs eagerly.
    """

    def __init__(
        self,
        target_model,
        drafter_model=None,
        num_speculative_tokens: int = 4,
        target_tokenizer=None,
        drafter_tokenizer=None,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        max_batch_size: int | None = None,
        accept_rule=None,
        static_cache: bool = True,
        compile: bool = False,
    ):
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        self.target = target_model.eval()
        self.drafter = drafter_model.eval() if drafter_model is not None else None
        self.num_speculative_tokens = num_speculative_tokens if drafter_model is not None else 0
        self.target_tokenizer, self.drafter_tokenizer = target_tokenizer, drafter_tokenizer
        self.eos_token_ids = (
            tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(target_model, target_tokenizer)
        )
        self.max_batch_size = max_batch_size
        self.accept_rule = accept_rule  # tests swap in a wrong rule to show the checks catch it
        self.vocab = output_vocab_size(target_model)
        self.device = input_device(self.target)
        self.drafter_device = input_device(self.drafter) if self.drafter is not None else None
        self.translator = None
        if self.drafter is not None and self.num_speculative_tokens:
            from sd2_ray.specdec.uag import Translator, needs_translation

            if needs_translation(target_tokenizer, drafter_tokenizer):
                self.translator = Translator(
                    target_tokenizer,
                    drafter_tokenizer,
                    self.vocab,
                    eos_ids_of(drafter_model, drafter_tokenizer),
                    device=self.drafter_device,
                )
        models = [m for m in (self.target, self.drafter) if m is not None]
        self.static_cache = static_cache and all(supports_static(m) for m in models)
        if static_cache and not self.static_cache:
            logger.info("attention implementation takes no 4D mask: growing KV caches instead of static ones")
        self.compile = compile and self.static_cache
        self._target_steps = DecodeSteps(self.target, self.compile)
        self._drafter_steps = (
            DecodeSteps(self.drafter, self.compile) if self.drafter is not None and self.translator is None else None
        )

    @property
    def cross_tokenizer(self) -> bool:
        return self.translator is not None

    @classmethod
    def from_dirs(
        cls,
        target_dir: str,
        drafter_dir: str | None = None,
        num_speculative_tokens: int = 4,
        dtype=torch.float32,
        *,
        device="cpu",
        drafter_device=None,
        device_map=None,
        **kwargs,
    ) -> SpeculativeEngine:
        """Load a pair: the target on ``device`` (or placed by an accelerate ``device_map``, e.g.
        "auto" to shard it over the visible GPUs), the drafter on ``drafter_device`` (default:
        the target's input device)."""
        from sd2_ray.models.io import load_model, load_tokenizer

        target = load_model(target_dir, dtype=dtype, device=device, device_map=device_map)
        target_tok = load_tokenizer(target_dir)
        drafter_device = drafter_device or input_device(target)
        drafter = load_model(drafter_dir, dtype=dtype, device=drafter_device) if drafter_dir else None
        drafter_tok = load_tokenizer(drafter_dir) if drafter_dir else None
        return cls(target, drafter, num_speculative_tokens, target_tok, drafter_tok, **kwargs)

    def generate(
        self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None, speculate: bool = True
    ) -> list[GenerationResult]:
        """``speculate=False`` decodes with the target alone (same output for greedy requests): a
        server turns drafting off for large batches, where verifying K drafts per row costs more
        target compute than the accepted tokens save."""
        for i, req in enumerate(requests):
            if not req.prompt_ids:
                raise ValueError(f"request {i}: empty prompt_ids")
        size = self.max_batch_size or len(requests) or 1
        results: list[GenerationResult] = []
        with torch.inference_mode():
            for start in range(0, len(requests), size):
                results.extend(self._generate_batch(requests[start : start + size], start, on_tokens, speculate))
        return results

    def _new_drafter(self, prompts: list[list[int]], capacity: int):
        if self.drafter is None or self.num_speculative_tokens == 0:
            return None
        if self.translator is not None:
            from sd2_ray.specdec.uag import CrossVocabDrafter

            return CrossVocabDrafter(self.drafter, self.translator, prompts, out_device=self.device)
        return SameVocabDrafter(
            self.drafter,
            prompts,
            self.vocab,
            out_device=self.device,
            steps=self._drafter_steps,
            capacity=capacity if self.static_cache else None,
        )

    def _new_target_cache(self, rows: list[Row], capacity: int):
        if self.static_cache:
            return StaticKV(self.target, len(rows), capacity, fixed_width=self.compile)
        return RaggedKV(self.target, len(rows))

    def _generate_batch(self, requests, offset: int, on_tokens, speculate: bool = True) -> list[GenerationResult]:
        K, eos = self.num_speculative_tokens, self.eos_token_ids
        rows = [Row.start(offset + i, r, K, eos) for i, r in enumerate(requests)]
        for row in rows:
            if row.request.max_new_tokens <= 0:
                row.finish_reason = "length"
        live = [row for row in rows if row.finish_reason is None]
        if live:
            self._decode(live, on_tokens, speculate)
        return [GenerationResult(row.tokens, row.finish_reason or "length", row.stats) for row in rows]

    def _decode(self, rows: list[Row], on_tokens, speculate: bool = True) -> None:
        prompts = [list(row.request.prompt_ids) for row in rows]
        rp = RowParams.from_params([row.request.sampling for row in rows], device=self.device)
        K = self.num_speculative_tokens
        # a row holds its prompt, its budget and at most K + 1 tokens in flight
        capacity = round_capacity(
            max(len(p) + row.request.max_new_tokens for p, row in zip(prompts, rows, strict=True)) + K + 1
        )
        target_kv = self._new_target_cache(rows, capacity)
        drafter = self._new_drafter(prompts, capacity) if speculate else None
        pending: list[list[int]] = prompts  # committed target ids not yet in the target cache
        histories = [list(p) for p in prompts]  # prompt + generated target ids (for UAG)
        steady = False  # past the first pass (prompt prefill): every chunk has its fixed shape
        while rows:
            # never draft past the largest remaining budget: those tokens could not be emitted
            k = min(K, max(row.remaining for row in rows) - 1) if drafter else 0
            if k > 0 and self.compile:
                k = K  # one shape every pass (a compiled graph each); rows' budgets cut drafts below
            uniforms = row_uniforms(rows, K, self.device)
            if k > 0:
                assert drafter is not None  # k is 0 without one
                drafts, draft_len, draft_probs = drafter.propose(k, rp, uniforms[:, :k], histories)
                # a row never drafts past its own budget, so its tokens don't depend on its batch
                budget = torch.tensor([row.remaining - 1 for row in rows], dtype=torch.long, device=self.device)
                draft_len = torch.minimum(draft_len, budget)
                if not self.compile:
                    width = int(draft_len.max())  # cross-tokenizer rows may all propose fewer than k
                    drafts = drafts[:, :width]
                    draft_probs = draft_probs[:, :width] if draft_probs is not None else None
            else:
                drafts = torch.zeros(len(rows), 0, dtype=torch.long, device=self.device)
                draft_len, draft_probs = torch.zeros(len(rows), dtype=torch.long, device=self.device), None
            logits = self._score(target_kv, pending, drafts, draft_len, steady)
            steady = True
            accepted, next_token = verify(
                logits,
                drafts,
                draft_len,
                draft_probs,
                rp,
                uniforms[:, K : K + drafts.shape[1]],
                uniforms[:, 2 * K],
                self.accept_rule,
            )
            target_kv.drop_last(draft_len - accepted)
            acc, nxt, lens = accepted.tolist(), next_token.tolist(), draft_len.tolist()
            draft_lists = drafts.tolist()
            new_tokens = [draft_lists[i][: acc[i]] + [nxt[i]] for i in range(len(rows))]
            for row, toks, a, m in zip(rows, new_tokens, acc, lens, strict=True):
                row.commit(toks, a, m, on_tokens)
            for history, toks in zip(histories, new_tokens, strict=True):
                history.extend(toks)
            pending = [[t] for t in nxt]
            if drafter is not None:
                drafter.commit(k, acc, nxt, new_tokens, histories)
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if len(keep) < len(rows):
                rows, pending = [rows[i] for i in keep], [pending[i] for i in keep]
                histories = [histories[i] for i in keep]
                if keep:
                    index = torch.tensor(keep, dtype=torch.long, device=self.device)
                    target_kv.select(index)
                    rp = rp.select(index)
                    if drafter is not None:
                        drafter.select(keep)

    def _score(
        self, kv, pending: list[list[int]], drafts: torch.Tensor, draft_len: torch.Tensor, steady: bool = False
    ) -> torch.Tensor:
        """Target logits (B, M+1, V) at the position before each draft token and after the last.
        ``steady``: every row has one pending token, so the chunk is (B, M+1) whatever the
        rows drafted (a compiled verification keeps one shape)."""
        width = drafts.shape[1]
        lens = draft_len.tolist()
        if all(len(p) == 1 for p in pending) and all(m == width for m in lens):
            tokens = torch.cat([torch.tensor(pending, dtype=torch.long, device=self.device), drafts], dim=1)
            real = torch.ones_like(tokens, dtype=torch.bool)
        else:
            draft_lists = drafts.tolist()
            tokens, real = right_aligned(
                [p + d[:m] for p, d, m in zip(pending, draft_lists, lens, strict=True)],
                self.device,
                width + 1 if steady else None,
            )
        logits = self._target_steps.logits(kv, tokens, real, width + 1, steady)
        if all(m == width for m in lens):
            return logits
        # row i's drafts end at the last column, so its window starts (width - m_i) columns later
        shift = width - draft_len
        columns = torch.arange(width + 1, device=self.device)
        index = (shift.unsqueeze(1) + columns.unsqueeze(0)).clamp_(max=width)
        return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
