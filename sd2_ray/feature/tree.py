"""Lossless tree speculative decoding with a feature head (EAGLE-2's dynamic draft tree).

Each pass, for one request with committed tokens x_0..x_{n-1} (the root is x_{n-1}):

1. **grow** (EAGLE-2, arXiv 2406.16858): the head first takes the verified (feature, next token)
   pairs not in its cache; its output at the last one scores the root's children. Each level
   keeps the ``top_k`` children of every expanded node, scored by the cumulative draft log-prob
   along its path, and expands the ``top_k`` best of the new level next (one head call for them,
   tree attention over the head's cache); ``depth`` levels in all. The ``total_tokens`` best
   nodes of everything generated form the draft tree (a parent scores at least as high as its
   children, and ties go to the shallower node, so the kept nodes are a tree);
2. **verify**: the target scores its uncached token(s) and every tree node in one forward on its
   KV cache, each node attending to the cache and its own ancestors (positions by depth);
3. **accept**, from the root down: greedy rows follow the child equal to the target's argmax
   (the longest matching path), sampled rows run recursive rejection sampling over the siblings:
   with p the (warped) target distribution at the node, the candidates are tried in order, x
   accepted with probability p(x) / sum(p), else p(x) is zeroed; with no child accepted the
   next token is drawn from what is left of p. The candidates are a deterministic function of
   the verified context (top-k of the head), so each step emits x with probability exactly p(x):
   the output follows the target's distribution whatever the head proposes;
4. the target's cache keeps the accepted path's entries only; the head's cache is cut back to
   its verified entries, and the target's features at the accepted positions are queued for it.

Per request (batch 1): rows are decoded one after another, each on its own caches, so a row's
output does not depend on its batch. Randomness: each request's generator draws
(depth + 1) * (top_k + 1) uniforms per pass, level l using [l (top_k + 1), l (top_k + 1) + top_k)
for sibling tests and the next one for the final draw. Stats: a pass counts its tree's nodes as
drafted tokens, so the acceptance rate is per node, MAL per target pass as for chains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd2_ray.feature.features import layer_features
from sd2_ray.feature.head import FeatureHead
from sd2_ray.specdec.engine import eos_ids_of, output_vocab_size
from sd2_ray.specdec.rows import Row, start_rows
from sd2_ray.specdec.sampling import RowParams, fit_vocab, sample, warp_probs
from sd2_ray.specdec.static_kv import MASK_KINDS, supports_static
from sd2_ray.specdec.types import GenerationRequest, GenerationResult, TokenCallback


@dataclass
class DraftTree:
    """Nodes in an order where parents come first; parent -1 is the root (the newest committed
    token); ``children[i + 1]``: node i's children in acceptance order (best score first), with
    ``children[0]`` the root's."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=lambda: [[]])

    def ancestors(self, i: int) -> list[int]:
        """Node i and its ancestors (not the root)."""
        path = []
        while i >= 0:
            path.append(i)
            i = self.parents[i]
        return path


def mask4d(visible: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, Q, S) mask from a (Q, S) bool visibility matrix, as the attention takes it."""
    visible = visible.view(1, 1, *visible.shape)
    if kind == "bool":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def keep_slots(cache, index: torch.Tensor) -> None:
    """Keep these entries (along the sequence) of every layer of a DynamicCache."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(2, index.to(layer.values.device))


def cache_length(cache) -> int:
    return cache.get_seq_length()


def causal_visibility(past: int, width: int, device) -> torch.Tensor:
    """(width, past + width): each new token sees the cache and the new tokens up to itself."""
    return torch.ones(width, past + width, dtype=torch.bool, device=device).tril(past)


class TreeSpecDecoder:
    """The :class:`sd2_ray.specdec.types.Engine` contract with EAGLE-2 tree drafting (per row)."""

    def __init__(
        self,
        target,
        head: FeatureHead,
        depth: int = 4,
        top_k: int = 4,
        total_tokens: int = 16,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        accept_rule=None,
    ):
        if depth < 0 or top_k < 1 or total_tokens < 1:
            raise ValueError("depth >= 0, top_k >= 1 and total_tokens >= 1 are needed")
        if not supports_static(target):
            raise ValueError("tree verification needs an attention that takes a 4D mask (sdpa or eager)")
        self.target, self.head = target.eval(), head.eval()
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(target)
        # accept_rule(residual_x, residual_total, u) -> bool; tests swap in a wrong one
        self.accept_rule = accept_rule or (lambda x, total, u: u * total < x)
        self.vocab = output_vocab_size(target)
        self.device = target.get_input_embeddings().weight.device
        self.mask_kind = MASK_KINDS[target.config._attn_implementation]

    def generate(
        self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None, speculate: bool = True
    ) -> list[GenerationResult]:
        rows = start_rows(requests, self.depth, self.eos_token_ids)
        with torch.inference_mode():
            for row in rows:
                if row.finish_reason is None:
                    _RowDecode(self, row, speculate).run(on_tokens)
        return [GenerationResult(row.tokens, row.finish_reason or "length", row.stats) for row in rows]


class _RowDecode:
    """One request's caches and the verified (feature, next id) pairs not in the head's cache."""

    def __init__(self, decoder: TreeSpecDecoder, row: Row, speculate: bool):
        from transformers import DynamicCache

        self.d, self.row, self.speculate = decoder, row, speculate
        self.rp = RowParams.from_params([row.request.sampling], device=decoder.device)
        self.target_cache, self.head_cache = DynamicCache(), DynamicCache()
        self.pending = list(row.request.prompt_ids)  # committed ids not in the target's cache
        self.head_features: list[torch.Tensor] = []
        self.head_ids: list[int] = []

    def run(self, on_tokens) -> None:
        d, first = self.d, True
        while self.row.finish_reason is None:
            depth = 0 if first or not self.speculate else min(d.depth, self.row.remaining - 1)
            size = (d.depth + 1) * (d.top_k + 1)
            generator = self.row.generator
            uniforms = torch.rand(size, generator=generator) if generator is not None else torch.zeros(size)
            tree = self.grow(depth) if depth else DraftTree()
            logits, features = self.score(tree)
            path, token = self.accept(tree, logits, uniforms)
            self.advance(tree, path, token, features)
            tokens = [tree.tokens[i] for i in path] + [token]
            self.row.commit(tokens, len(path), len(tree.tokens), on_tokens)
            first = False

    # ---- drafting ------------------------------------------------------------------------------

    def grow(self, depth: int) -> DraftTree:
        """EAGLE-2's expansion and reranking; the head's cache is back to its verified entries after."""
        d = self.d
        verified = cache_length(self.head_cache) + len(self.head_ids)
        out = self.head_step(torch.cat(self.head_features), self.head_ids, None)
        self.head_features, self.head_ids = [], []
        pool, scores = DraftTree(), list[float]()
        features = {-1: out.regress_features[0, -1]}  # node -> the head's predicted feature there
        expanded = {-1: self.log_probs(out.logits[0, -1])}  # node -> its children's log-probs
        slots: dict[int, int] = {}  # node -> its entry in the head's cache
        for level in range(1, depth + 1):
            new = self.add_children(pool, scores, expanded, level)
            if level == depth:
                break
            frontier = sorted(new, key=lambda i: (-scores[i], i))[: d.top_k]
            expanded = self.expand(pool, frontier, features, slots, verified)
        # the tree's entries leave the head's cache: the target's verified features replace them
        keep_slots(self.head_cache, torch.arange(verified, device=d.device))
        return rerank(pool, scores, d.total_tokens)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(fit_vocab(logits.float(), self.d.vocab), dim=-1)

    def head_step(self, features: torch.Tensor, ids: list[int], visible, positions=None, keep: int = 1):
        """One head call on its cache: ``visible`` (width, past + width) or None (causal)."""
        device, past, width = self.d.device, cache_length(self.head_cache), len(ids)
        if visible is None:
            visible = causal_visibility(past, width, device)
        if positions is None:
            positions = torch.arange(past, past + width, device=device)
        mask = mask4d(visible, "additive", features.dtype)  # the head's decoder layer is eager
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        return self.d.head.step(features.unsqueeze(0), ids_t, mask, positions.view(1, -1), self.head_cache, True, keep)

    def add_children(self, pool: DraftTree, scores: list[float], expanded: dict, level: int) -> list[int]:
        """The top_k children of each expanded node join the pool, scored by path log-prob."""
        new = []
        for parent, log_probs in expanded.items():
            base = scores[parent] if parent >= 0 else 0.0
            values, tokens = log_probs.topk(self.d.top_k)
            for value, token in zip(values.tolist(), tokens.tolist(), strict=True):
                pool.tokens.append(token)
                pool.parents.append(parent)
                pool.depths.append(level)
                scores.append(base + value)
                new.append(len(pool.tokens) - 1)
        return new

    def expand(self, pool: DraftTree, frontier: list[int], features: dict, slots: dict, verified: int) -> dict:
        """One head call over the frontier: node i reads (its parent's predicted feature, its
        token) and sees the verified entries and its ancestors' (tree attention)."""
        past = cache_length(self.head_cache)
        for j, i in enumerate(frontier):
            slots[i] = past + j
        visible = torch.zeros(len(frontier), past + len(frontier), dtype=torch.bool, device=self.d.device)
        visible[:, :verified] = True
        for j, i in enumerate(frontier):
            visible[j, [slots[a] for a in pool.ancestors(i)]] = True
        positions = torch.tensor([verified - 1 + pool.depths[i] for i in frontier], device=self.d.device)
        inputs = torch.stack([features[pool.parents[i]] for i in frontier])
        out = self.head_step(inputs, [pool.tokens[i] for i in frontier], visible, positions, keep=0)
        for j, i in enumerate(frontier):
            features[i] = out.regress_features[0, j]
        return {i: self.log_probs(out.logits[0, j]) for j, i in enumerate(frontier)}

    # ---- verification --------------------------------------------------------------------------

    def score(self, tree: DraftTree):
        """The target over pending + tree nodes: logits (N + 1, V) at the root and every node,
        and the features (P + N, H) of those columns (None when not drafting)."""
        d, device = self.d, self.d.device
        past, width, n = cache_length(self.target_cache), len(self.pending), len(tree.tokens)
        visible = torch.zeros(width + n, past + width + n, dtype=torch.bool, device=device)
        visible[:width] = causal_pad(past, width, n, device)
        visible[width:, : past + width] = True
        for i in range(n):
            visible[width + i, [past + width + a for a in tree.ancestors(i)]] = True
        positions = list(range(past, past + width)) + [past + width - 1 + depth for depth in tree.depths]
        out = d.target(
            input_ids=torch.tensor([self.pending + tree.tokens], device=device),
            attention_mask=mask4d(visible, d.mask_kind, d.target.dtype),
            position_ids=torch.tensor([positions], device=device),
            past_key_values=self.target_cache,
            use_cache=True,
            output_hidden_states=self.speculate,
        )
        features = None
        if self.speculate:
            hidden = layer_features(out.hidden_states, d.head.config.feature_layers)
            features = d.head.reduce_features(hidden[0].to(device))
        return fit_vocab(out.logits[0, width - 1 :].to(device), d.vocab), features

    def accept(self, tree: DraftTree, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[list[int], int]:
        """(accepted path of node indices, the next token) from the root down."""
        k = self.d.top_k
        greedy = self.rp.all_greedy
        probs = None if greedy else warp_probs(logits.unsqueeze(0), self.rp)[0]
        path: list[int] = []
        node = -1
        while True:
            children = tree.children[node + 1]
            if greedy:
                best = int(logits[node + 1].argmax())
                chosen = next((c for c in children if tree.tokens[c] == best), None)
                if chosen is None:
                    return path, best
            else:
                assert probs is not None
                u = uniforms[len(path) * (k + 1) : (len(path) + 1) * (k + 1)]
                residual = probs[node + 1].clone()
                chosen = None
                for j, c in enumerate(children):
                    x = tree.tokens[c]
                    if self.d.accept_rule(float(residual[x]), float(residual.sum()), float(u[j])):
                        chosen = c
                        break
                    residual[x] = 0.0  # rejected: the next sibling competes for what is left
                if chosen is None:
                    return path, int(sample(residual.unsqueeze(0), u[k : k + 1].to(residual.device)))
            path.append(chosen)
            node = chosen

    def advance(self, tree: DraftTree, path: list[int], token: int, features) -> None:
        """The target's cache keeps its verified entries and the accepted path's; the head gets
        the target's features of the newly verified positions."""
        width, n = len(self.pending), len(tree.tokens)
        past = cache_length(self.target_cache) - width - n
        keep = list(range(past + width)) + [past + width + i for i in path]
        keep_slots(self.target_cache, torch.tensor(keep, dtype=torch.long, device=self.d.device))
        if self.speculate:
            columns = list(range(width)) + [width + i for i in path]
            self.head_features.append(features[columns])
            self.head_ids.extend((self.pending + [tree.tokens[i] for i in path] + [token])[1:])
        self.pending = [token]


def causal_pad(past: int, width: int, n: int, device) -> torch.Tensor:
    """(width, past + width + n): pending tokens see the cache and pending tokens up to themselves."""
    visible = torch.zeros(width, past + width + n, dtype=torch.bool, device=device)
    visible[:, : past + width] = causal_visibility(past, width, device)
    return visible


def rerank(pool: DraftTree, scores: list[float], total: int) -> DraftTree:
    """The ``total`` best nodes by path score as a tree: parents first, siblings best first. A
    parent scores at least as high as its children (log-probs are <= 0) and wins ties (shallower),
    so a kept node's parent is kept; a node whose parent is not is dropped all the same."""
    best = sorted(range(len(pool.tokens)), key=lambda i: (-scores[i], pool.depths[i], i))[:total]
    kept = sorted(best, key=lambda i: (pool.depths[i], -scores[i], i))
    index: dict[int, int] = {-1: -1}
    tree = DraftTree()
    for old in kept:
        parent = pool.parents[old]
        if parent not in index:
            continue
        index[old] = len(tree.tokens)
        tree.tokens.append(pool.tokens[old])
        tree.parents.append(index[parent])
        tree.depths.append(pool.depths[old])
        tree.children.append([])
        tree.children[index[parent] + 1].append(index[old])
    return tree
