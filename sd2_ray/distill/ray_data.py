"""The Ray Data adapter of distillation: pending requests -> the engine (an actor pool of
transformers callables, or ``ray.data.llm``'s vLLM processor) -> results, streamed back per shard.

One dataset holds every pending request in input order (blocks of ``batch_size`` rows, so
work streams to the actors); the driver consumes the output with ``iter_batches`` and hands
each shard's rows to ``on_shard`` as soon as the last of them arrives, so finished shards are
written while later ones are still generating. The engines' settings are built by pure code
(:mod:`sd2_ray.distill.engines`, :mod:`sd2_ray.distill.vllm_engine`); this module only places them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sd2_ray.distill.core import Generated, Request
from sd2_ray.distill.engines import to_generated

log = logging.getLogger(__name__)

ShardHandler = Callable[[int, list[tuple[Request, Generated]]], None]


def generate_shards(
    requests: list[Request],
    model_dir: str,
    config,
    eos_ids: list[int],
    on_shard: ShardHandler,
    progress=None,
    context: int | None = None,
    vision: bool = False,
) -> None:
    """Run every request through the engine; call ``on_shard(shard, [(request, generated)])`` once
    per shard, when all of its requests are answered. ``context``: the target's context length
    (vLLM's max_model_len unless the config sets one). ``vision``: the target is a LLaVA model
    (the rows carry their image references; the actors read the images)."""
    import ray

    from sd2_ray.runtime import ensure_ray, require_reachable

    if not requests:
        return
    ensure_ray()
    require_reachable(config.output)
    quiet_ray_data()
    by_index = {r.index: r for r in requests}
    expected: dict[int, int] = defaultdict(int)
    for r in requests:
        expected[r.shard] += 1
    blocks = max(1, -(-len(requests) // config.batch_size))
    ds = ray.data.from_items([r.engine_item(with_images=vision) for r in requests], override_num_blocks=blocks)
    ds = apply_engine(ds, model_dir, config, eos_ids, context, vision)
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


def apply_engine(ds, model_dir: str, config, eos_ids: list[int], context: int | None = None, vision: bool = False):
    """The configured engine as a Ray Data stage over request rows."""
    if config.engine == "vllm":
        return vllm_processor(model_dir, config, eos_ids, context)(ds)
    return apply_transformers(ds, model_dir, config, vision)


def apply_transformers(ds, model_dir: str, config, vision: bool = False) -> Any:
    """An actor pool of ``actors`` transformers callables (on-policy mode: the drafter-writes,
    target-scores callable; a LLaVA target: the vision engine's). ``model_dir`` is the
    configured path (local or s3://); each actor resolves it itself. The actors get the
    driver's storage environment (AWS_*, SD2_CACHE_DIR) so they reach the same S3 endpoint even
    when Ray was started before it was set."""
    import warnings

    from sd2_ray.distill.engines import TransformersBatchUDF, transformers_settings
    from sd2_ray.runtime import actor_pool_args

    udf: type = TransformersBatchUDF  # the actor class, built with kwargs
    kwargs = {"model_dir": model_dir, "settings": transformers_settings(config)}
    if config.mode == "on-policy":
        from sd2_ray.distill.onpolicy import OnPolicyBatchUDF

        udf, kwargs = OnPolicyBatchUDF, {**kwargs, "drafter_dir": config.drafter}
    elif vision:
        from sd2_ray.distill.vision_engine import VisionBatchUDF

        udf = VisionBatchUDF
    with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            udf, fn_constructor_kwargs=kwargs, batch_size=config.batch_size, **actor_pool_args(config)
        )


def vllm_processor(model_dir: str, config, eos_ids: list[int], context: int | None = None):
    """Ray's ``ray.data.llm`` vLLM processor built from :func:`vllm_engine.processor_kwargs`."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from sd2_ray.distill import vllm_engine
    from sd2_ray.runtime import worker_env

    warn_if_replicas_take_every_cpu(config)
    processor_config = vLLMEngineProcessorConfig(
        **vllm_engine.processor_kwargs(model_dir, config, context, worker_env())
    )
    sampling = vllm_engine.sampling_params(config)
    top_k, max_new = config.logprobs_top_k, config.max_new_tokens
    return build_processor(
        processor_config,
        preprocess=lambda row: vllm_engine.request_row(row, sampling),
        postprocess=lambda row: vllm_engine.vllm_result(row, eos_ids, max_new, top_k),
    )


def warn_if_replicas_take_every_cpu(config) -> None:
    """CPU replicas that reserve every CPU of the cluster leave none for Ray Data's row stages
    (the processor's pre- and postprocess tasks): the engines start and then wait forever."""
    import ray

    if config.gpus_per_actor:
        return
    reserved = config.actors * config.tensor_parallel_size * config.cpus_per_actor
    total = ray.cluster_resources().get("CPU", 0)
    if reserved > total - 1:
        log.warning(
            "distill: the vLLM replicas reserve %g of the cluster's %g CPUs (actors x "
            "tensor_parallel_size x cpus_per_actor); Ray Data's row stages need at least one more, "
            "or the run waits forever: lower cpus_per_actor or actors",
            reserved,
            total,
        )
