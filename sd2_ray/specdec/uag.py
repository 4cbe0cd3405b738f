"""Cross-tokenizer drafting (Universal Assisted Generation), lossless in both modes.

- Greedy rows: the drafter drafts in its own vocabulary; the draft is decoded to text and
  re-encoded with the target's tokenizer behind a look-back window of the target's recent text
  (so token boundaries line up with what the target has already committed); the target
  verifies those ids greedily. Correctness never depends on the translation: the target only
  commits its own argmax, a poor translation just lowers acceptance.
- Sampled rows: token-level intersection (Timor et al., arXiv 2502.05202). The drafter's
  distribution is restricted to tokens whose text exists in both vocabularies, renormalized and
  moved to target ids; standard speculative sampling over that q is exact for p.
After each verification the drafter's context is re-synced from the committed *text*: the
generated text is re-encoded with the drafter's tokenizer, the drafter cache keeps the longest
common prefix with it and the rest is fed next step (cache rollback, no prefix recomputation).
The transformers ``AssistantToAssistedTranslator`` does the intersection with a similar idea.
"""

from __future__ import annotations

import logging

import torch

from sd2_ray.specdec.kv import RaggedKV, right_aligned
from sd2_ray.specdec.sampling import RowParams, pick

logger = logging.getLogger(__name__)

LOOKBACK_TOKENS = 8
REPLACEMENT = "\ufffd"
SPECIAL_MARK = "\x00special:"


def needs_translation(target_tok, drafter_tok) -> bool:
    """True when both tokenizers are known and map text to ids differently."""
    if target_tok is None or drafter_tok is None:
        return False
    return target_tok.get_vocab() != drafter_tok.get_vocab()


def token_texts(tokenizer) -> list[str | None]:
    """The text each id adds after other text (leading spaces kept); special tokens by name
    (marked, so they never equal text); None for ids that are not whole characters."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    base = tokenizer.decode(anchor)
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for i in range(len(tokenizer)):
        if i in special:  # special tokens match only special tokens of the same name
            out.append(SPECIAL_MARK + tokenizer.convert_ids_to_tokens(i))
            continue
        text = tokenizer.decode(anchor + [i])
        piece = text[len(base) :] if text.startswith(base) else None
        out.append(piece if piece and REPLACEMENT not in piece else None)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Translator:
    """What is shared by all batches of one cross-tokenizer pair: the vocabulary map."""

    def __init__(self, target_tok, drafter_tok, target_vocab: int, drafter_eos_ids=(), device=None):
        if target_tok is None or drafter_tok is None:
            raise ValueError("a cross-tokenizer pair needs both tokenizers")
        self.target_tok, self.drafter_tok = target_tok, drafter_tok
        self.target_vocab = target_vocab
        target_ids: dict[str, int] = {}
        for i, text in enumerate(token_texts(target_tok)):
            if text is not None and i < target_vocab:
                target_ids.setdefault(text, i)
        d2t = [target_ids.get(text, -1) if text is not None else -1 for text in token_texts(drafter_tok)]
        target_eos = target_tok.eos_token_id
        if target_eos is not None:  # end of text means the same in both vocabularies
            for e in set(drafter_eos_ids) | {drafter_tok.eos_token_id}:
                if e is not None and e < len(d2t):
                    d2t[e] = target_eos
        self.drafter_to_target = torch.tensor(d2t, dtype=torch.long, device=device)  # on the drafter's device
        self.shared = self.drafter_to_target >= 0
        logger.info(
            "cross-tokenizer pair: %d of %d drafter tokens exist in the target vocabulary",
            int(self.shared.sum()),
            len(d2t),
        )

    def draft_text(self, context: list[int], drafted: list[int]) -> str:
        """Text of drafted drafter ids as it continues the context (leading spaces kept)."""
        window = context[-LOOKBACK_TOKENS:]
        base = self.drafter_tok.decode(window)
        full = self.drafter_tok.decode(window + drafted)
        text = full[len(base) :] if full.startswith(base) else self.drafter_tok.decode(drafted)
        return text.rstrip(REPLACEMENT)  # an unfinished character is not text yet

    def target_candidates(self, history: list[int], text: str, limit: int) -> list[int]:
        """Target ids for ``text`` as it continues ``history`` (target ids), aligned on a
        look-back window so that the first candidate starts a fresh target token."""
        if not text:
            return []
        tok = self.target_tok
        lookback = tok.decode(history[-LOOKBACK_TOKENS:])
        both = tok.encode(lookback + text, add_special_tokens=False)
        alone = tok.encode(lookback, add_special_tokens=False)
        if both[: len(alone)] == alone:
            ids = both[len(alone) :]
        else:
            ids = tok.encode(text, add_special_tokens=False)
        return [i for i in ids[:limit] if i < self.target_vocab]

    def drafter_context(self, prompt_ids: list[int], generated: list[int]) -> list[int]:
        """Drafter ids for the target's text: prompt and generated part encoded separately so the
        prompt's ids never change as text is appended."""
        return self.drafter_prompt(prompt_ids) + self.drafter_tok.encode(
            self.target_tok.decode(generated), add_special_tokens=False
        )

    def drafter_prompt(self, prompt_ids: list[int]) -> list[int]:
        ids = list(prompt_ids)
        bos = self.target_tok.bos_token_id
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        out = self.drafter_tok.encode(self.target_tok.decode(ids), add_special_tokens=True)
        return out or [self.drafter_tok.bos_token_id or self.drafter_tok.eos_token_id or 0]


class CrossVocabDrafter:
    """Drafts target ids with a drafter that has another tokenizer (see module docstring)."""

    def __init__(self, model, translator: Translator, prompts: list[list[int]], out_device=None):
        self.tr = translator
        self.kv = RaggedKV(model, len(prompts))
        self.device = self.kv.device  # the drafter's own device
        self.out_device = out_device if out_device is not None else self.device  # the target's
        self.prompts = [list(p) for p in prompts]
        self.prompt_ctx = [translator.drafter_prompt(p) for p in prompts]
        self.context = [list(c) for c in self.prompt_ctx]  # drafter ids the drafter should see
        self.cached = [0] * len(prompts)  # how many of them are in its cache
        self.shared = translator.shared.to(self.device)
        self.d2t = translator.drafter_to_target.to(self.device)

    def propose(self, k: int, rp: RowParams, uniforms: torch.Tensor, histories: list[list[int]]):
        tokens, real = right_aligned([c[n:] for c, n in zip(self.context, self.cached, strict=True)], self.device)
        logits = self.kv.forward(tokens, real, logits_to_keep=1)[:, -1]
        rp, uniforms = rp.to(self.device), uniforms.to(self.device)
        greedy_rows = rp.greedy.unsqueeze(1)
        drafted, probs = [], []
        for j in range(k):
            vocab = logits.shape[-1]
            shared = (
                self.shared[:vocab]
                if len(self.shared) >= vocab
                else torch.cat(
                    [self.shared, torch.zeros(vocab - len(self.shared), dtype=torch.bool, device=self.device)]
                )
            )
            # sampled rows only ever draft shared tokens (intersection); greedy rows draft freely
            restricted = logits.masked_fill(~shared & ~greedy_rows, float("-inf"))
            token, prob = pick(restricted, rp, uniforms[:, j])
            drafted.append(token)
            probs.append(prob)
            if j < k - 1:
                logits = self.kv.forward(
                    token.unsqueeze(1), torch.ones_like(token, dtype=torch.bool).unsqueeze(1), logits_to_keep=1
                )[:, -1]
        drafted_ids = torch.stack(drafted, dim=1)
        drafted_lists = drafted_ids.tolist()
        for i in range(len(self.context)):
            self.context[i] = self.context[i] + drafted_lists[i][: k - 1]
            self.cached[i] = len(self.context[i])
        greedy = rp.greedy.tolist()
        mapped = self.d2t[drafted_ids.clamp(max=len(self.d2t) - 1)].clamp(min=0).tolist()
        rows, lens = [], []
        for i, is_greedy in enumerate(greedy):
            if is_greedy:
                context = self.context[i][: len(self.context[i]) - (k - 1)]
                text = self.tr.draft_text(context, drafted_lists[i])
                ids = self.tr.target_candidates(histories[i], text, k)
            else:
                ids = mapped[i]
            rows.append(list(ids) + [0] * (k - len(ids)))  # padding past draft_len is never read
            lens.append(len(ids))
        # built in Python and copied once (not one small copy per row) onto the target's device
        drafts = torch.tensor(rows, dtype=torch.long, device=self.out_device).view(len(rows), k)
        draft_len = torch.tensor(lens, dtype=torch.long, device=self.out_device)
        return drafts, draft_len, self._target_probs(probs)

    def _target_probs(self, probs: list) -> torch.Tensor | None:
        """Drafter distributions moved onto target ids (mass only on shared tokens)."""
        if probs[0] is None:
            return None
        q = torch.stack(probs, dim=1)  # (B, k, V_drafter)
        vocab = min(q.shape[-1], len(self.d2t))
        q, d2t, shared = q[..., :vocab], self.d2t[:vocab], self.shared[:vocab]
        out = q.new_zeros(q.shape[:-1] + (self.tr.target_vocab,))
        return out.index_add_(-1, d2t[shared], q[..., shared]).to(self.out_device)

    def commit(self, k: int, accepted: list[int], next_tokens: list[int], new_tokens, histories):
        drop = []
        for i, history in enumerate(histories):
            generated = history[len(self.prompts[i]) :]
            want = self.tr.drafter_context(self.prompts[i], generated)
            keep = common_prefix(want, self.context[i][: self.cached[i]])
            # the next draft needs logits after the last token: re-feed it when the cache already
            # covers all the text (the drafter's own drafts can spell the committed text exactly)
            keep = min(keep, self.cached[i], len(want) - 1)
            drop.append(self.cached[i] - keep)
            self.context[i], self.cached[i] = want, keep
        self.kv.drop_last(torch.tensor(drop, dtype=torch.long, device=self.device))

    def select(self, rows: list[int]) -> None:
        self.kv.select(torch.tensor(rows, dtype=torch.long, device=self.device))
        self.prompts = [self.prompts[i] for i in rows]
        self.prompt_ctx = [self.prompt_ctx[i] for i in rows]
        self.context = [self.context[i] for i in rows]
        self.cached = [self.cached[i] for i in rows]
