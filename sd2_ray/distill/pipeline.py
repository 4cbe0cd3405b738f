"""The Ray Data adapter: pending requests -> engine actor pool -> results, streamed back per shard.

One dataset holds every pending request in input order (blocks of ``batch_size`` rows, so
work streams to the actors); the driver consumes the output with ``iter_batches`` and hands
each shard's rows to ``on_shard`` as soon as the last of them arrives, so finished shards are
written while later ones are still generating.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable

from sd2_ray.distill.core import Generated, Request
from sd2_ray.distill.engines import apply_engine, vllm_result

log = logging.getLogger(__name__)

ShardHandler = Callable[[int, list[tuple[Request, Generated]]], None]


def generate_shards(requests: list[Request], model_dir: str, config, eos_ids: list[int],
                    on_shard: ShardHandler, progress=None) -> None:
    """Run every request through the engine; call ``on_shard(shard, [(request, generated)])`` once
    per shard, when all of its requests are answered."""
    import ray

    from sd2_ray.runtime import ensure_ray

    if not requests:
        return
    ensure_ray()
    quiet_ray_data()
    by_index = {r.index: r for r in requests}
    expected: dict[int, int] = defaultdict(int)
    for r in requests:
        expected[r.shard] += 1
    blocks = max(1, -(-len(requests) // config.batch_size))
    ds = ray.data.from_items([r.engine_item() for r in requests], override_num_blocks=blocks)
    ds = apply_engine(ds, model_dir, config, eos_ids)
    pending: dict[int, list[tuple[Request, Generated]]] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for row in batch.to_dict("records"):
            generated = to_generated(row, eos_ids, config.max_new_tokens, config.logprobs_top_k)
            request = by_index.pop(generated.index, None)
            if request is None:  # a retried task can deliver a row twice: keep the first
                log.debug("duplicate result for row %d ignored", generated.index)
                continue
            pending[request.shard].append((request, generated))
            if progress is not None:
                progress.update(1)
            if len(pending[request.shard]) == expected[request.shard]:
                on_shard(request.shard, pending.pop(request.shard))
    if by_index:
        raise RuntimeError(f"engine returned no result for {len(by_index)} rows (e.g. row {min(by_index)})")


def quiet_ray_data() -> None:
    """Our tqdm bar counts rows per shard; Ray Data's own progress logging would drown it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def to_generated(row: dict[str, Any], eos_ids: list[int], max_new_tokens: int, top_k: int = 0) -> Generated:
    """An engine output row (either engine; vLLM error rows skip the postprocess) as Generated."""
    if "response" not in row:  # a raw vLLM row: ray.data.llm sends failed rows past the postprocess
        row = vllm_result(row, eos_ids, max_new_tokens, top_k)
    error = row.get("error")
    text = row.get("response")
    ids = row.get("response_ids")
    return Generated(index=int(row["index"]), text=None if _missing(text) else str(text),
                     finish_reason=None if _missing(row.get("finish_reason")) else str(row["finish_reason"]),
                     response_tokens=int(row.get("response_tokens") or 0),
                     error=None if _missing(error) or error == "" else str(error),
                     token_ids=None if _missing(ids) else [int(t) for t in ids],
                     topk_ids=_matrix(row.get("topk_ids"), "int32", top_k),
                     topk_logprobs=_matrix(row.get("topk_logprobs"), "float32", top_k))


def _matrix(value: Any, dtype: str, k: int):
    """A nested list column's cell (pandas gives an array of arrays) as an (n, k) array."""
    import numpy as np

    if not k or _missing(value):
        return None
    if len(value) == 0:
        return np.zeros((0, k), dtype=dtype)
    if hasattr(value, "flatten"):  # an Arrow list array (a UDF's cell before Ray Data stacks it)
        return value.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, k)
    return np.stack([np.asarray(v, dtype=dtype) for v in value])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # pandas gives NaN for nulls
