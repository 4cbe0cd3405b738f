"""Target engines behind one interface: a Ray Data stage mapping request rows
``{index, shard, prompt_ids, prompt_text}`` to result rows
``{index, shard, response, finish_reason, response_tokens, error}``.

- ``transformers``: :class:`TransformersEngine` (batched ``generate`` with KV cache, left padding)
  wrapped in :class:`TransformersBatchUDF`, a callable class Ray Data runs on an actor pool
  (one model load per actor).
- ``vllm``: Ray's own ``ray.data.llm`` vLLM processor (tensor parallel, replicas = concurrency).

Result rows also carry ``response_ids`` (EOS included when generation stopped on it) and, with
``logprobs_top_k`` = k > 0, ``topk_ids`` / ``topk_logprobs`` (one k-list per response id; see
:mod:`sd2_ray.distill.scoring` for which distribution). On-policy mode's actor lives in
:mod:`sd2_ray.distill.onpolicy`.

Nothing here imports Ray, vLLM or torch at module level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sd2_ray.distill.core import Generated
from sd2_ray.distill.scoring import TopK, generation_topk, vllm_topk, with_stop_token

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("index", "shard", "response", "finish_reason", "response_tokens", "error")
TOKEN_COLUMNS = ("response_ids", "topk_ids", "topk_logprobs")


@dataclass
class EngineOutput:
    """One prompt's generation: ``kept`` (ids without the EOS, what the text decodes from),
    ``response_ids`` (with the EOS that ended it), the target's top-k per response id."""

    kept: list[int]
    reason: str
    response_ids: list[int]
    topk: TopK | None = None


class TransformersEngine:
    """Batched HF generation for token-id prompts. At temperature 0 each row's output equals an
    unbatched greedy ``model.generate`` on the same ids (left padding + attention mask)."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu",
                 torch_threads: int | None = None, trust_remote_code: bool = False):
        import torch

        from sd2_ray.models.io import load_model, load_tokenizer, resolve_model_dir

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.torch = torch
        self.device = device
        # Resolved here, in the process that loads the weights: an s3:// model is downloaded
        # into this node's cache (shared safely by the actors of one node), never on the driver.
        local = resolve_model_dir(model_dir)
        self.model = load_model(local, dtype=getattr(torch, dtype), device=device,
                                trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(local, trust_remote_code=trust_remote_code)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[tuple[list[int], str]]:
        """(generated ids without the EOS, finish_reason) per prompt, in one batched call."""
        return [(o.kept, o.reason) for o in self.generate_scored(prompts, max_new_tokens, temperature, top_p, seed)]

    def generate_scored(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int | None = None, top_k: int = 0) -> list[EngineOutput]:
        """One batched call; with ``top_k`` also the top-k of the raw logits of every step
        (``output_logits``: the logits before temperature / top-p, at temperature 1)."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if top_k:
            sampling.update(return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_ids, use_cache=True, **sampling)
        sequences = out.sequences if top_k else out
        generated = [seq[width:].tolist() for seq in sequences]
        outputs = []
        for gen in generated:
            kept, reason = split_at_eos(gen, self.eos_ids, max_new_tokens)
            outputs.append(EngineOutput(kept, reason, with_stop_token(gen, kept)))
        if top_k:
            scores = generation_topk(out.logits, [len(o.response_ids) for o in outputs], top_k)
            for o, topk in zip(outputs, scores):
                o.topk = topk
        return outputs

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's EOS id(s), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def split_at_eos(generated: list[int], eos_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated sequence at its first EOS (padding follows it in a batch)."""
    for pos, token in enumerate(generated):
        if token in eos_ids:
            return generated[:pos], "stop"
    return generated, "length" if len(generated) >= max_new_tokens else "stop"


class TransformersBatchUDF:
    """Ray Data ``map_batches`` callable: loads the target once per actor, answers request batches.

    A batch that raises is retried row by row, so one bad row is recorded with its error and
    the others still get their responses.
    """

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        self.settings = settings
        _record_pid()
        self.engine = TransformersEngine(model_dir, dtype=settings["dtype"], device=settings["device"],
                                         torch_threads=settings.get("torch_threads"),
                                         trust_remote_code=settings.get("trust_remote_code", False))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        indices = [int(i) for i in batch["index"]]
        prompts = [[int(t) for t in p] for p in batch["prompt_ids"]]
        try:
            generated = self._generate(prompts, indices)
        except Exception as err:  # noqa: BLE001 - fall back to one row at a time
            log.warning("batch of %d rows failed (%s); retrying row by row", len(prompts), err)
            generated = [self._generate_one(p, i) for p, i in zip(prompts, indices)]
        out: dict[str, list] = {"index": indices, "shard": [int(s) for s in batch["shard"]],
                                "response": [g.text for g in generated],
                                "finish_reason": [g.finish_reason for g in generated],
                                "response_tokens": [g.response_tokens for g in generated],
                                "error": [g.error for g in generated]}
        out.update(token_columns(generated, self.settings.get("logprobs_top_k", 0)))
        return out

    def _generate(self, prompts: list[list[int]], indices: list[int]) -> list[Generated]:
        s = self.settings  # the seed follows the batch's first row, so a rerun samples the same
        outputs = self.engine.generate_scored(prompts, s["max_new_tokens"], s["temperature"], s["top_p"],
                                              seed=s["seed"] + min(indices), top_k=s.get("logprobs_top_k", 0))
        return [generated_of(i, self.engine.decode(o.kept), o) for i, o in zip(indices, outputs)]

    def _generate_one(self, prompt: list[int], index: int) -> Generated:
        try:
            return self._generate([prompt], [index])[0]
        except Exception as err:  # noqa: BLE001 - recorded on the row, the job goes on
            return Generated(index, None, None, 0, error=f"{type(err).__name__}: {err}")


def generated_of(index: int, text: str, output: EngineOutput) -> Generated:
    topk_ids, topk_lp = output.topk if output.topk is not None else (None, None)
    return Generated(index, text, output.reason, len(output.kept), token_ids=output.response_ids,
                     topk_ids=topk_ids, topk_logprobs=topk_lp)


def token_columns(generated: list[Generated], top_k: int) -> dict[str, list]:
    """The token-level result columns. Top-k cells are one Arrow list<value> array per row
    (empty for a failed row): Ray Data stacks a column of Arrow arrays into list<list<...>>
    without a Python object per value (nested Python lists cost ~6 % of generation time)."""
    out: dict[str, list] = {"response_ids": [g.token_ids for g in generated]}
    if top_k:
        out["topk_ids"] = [row_list_array(g.topk_ids, top_k, "int32") for g in generated]
        out["topk_logprobs"] = [row_list_array(g.topk_logprobs, top_k, "float32") for g in generated]
    return out


def row_list_array(matrix, k: int, dtype: str):
    """An (n, k) matrix (None: no rows) as an Arrow list<dtype> array of n lists of k values."""
    import numpy as np
    import pyarrow as pa

    values = np.zeros(0, dtype=dtype) if matrix is None else np.ascontiguousarray(matrix, dtype=dtype).ravel()
    offsets = np.arange(0, len(values) + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


ACTOR_PID_DIR_ENV = "SD2_DISTILL_ACTOR_PID_DIR"


def _record_pid() -> None:
    """Test hook: with ``SD2_DISTILL_ACTOR_PID_DIR`` set, each engine actor leaves its PID there
    (lets a test SIGKILL a live actor to exercise Ray's restart path)."""
    import os

    pid_dir = os.environ.get(ACTOR_PID_DIR_ENV)
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"{os.getpid()}.pid"), "w") as f:
            f.write(str(os.getpid()))


def apply_transformers(ds, model_dir: str, config) -> Any:
    """Ray Data stage: an actor pool of :class:`TransformersBatchUDF` (``actors`` replicas).

    ``model_dir`` is the configured path (local or s3://); each actor resolves it itself. The
    actors get the driver's current storage environment (AWS_*, SD2_CACHE_DIR) so they reach
    the same S3 endpoint even when Ray was started before it was set.
    """
    settings = {**config.sampling_dict(), "dtype": config.dtype,
                "device": "cuda" if config.gpus_per_actor > 0 else "cpu",
                "torch_threads": config.torch_threads or max(1, int(config.cpus_per_actor)),
                "trust_remote_code": config.trust_remote_code, "logprobs_top_k": config.logprobs_top_k}
    import os
    import warnings

    import ray

    from sd2_ray.runtime import worker_env

    env = worker_env()
    if os.environ.get(ACTOR_PID_DIR_ENV):
        env[ACTOR_PID_DIR_ENV] = os.environ[ACTOR_PID_DIR_ENV]
    udf, kwargs = TransformersBatchUDF, {"model_dir": model_dir, "settings": settings}
    if config.mode == "on-policy":
        from sd2_ray.distill.onpolicy import OnPolicyBatchUDF

        udf, kwargs = OnPolicyBatchUDF, {**kwargs, "drafter_dir": config.drafter}
    with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            udf, fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=config.actors), batch_size=config.batch_size,
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor or None, runtime_env={"env_vars": env},
            max_restarts=config.max_restarts,
            max_task_retries=-1 if config.max_restarts != 0 else 0)


def vllm_processor(model_dir: str, config, eos_ids: list[int]):
    """Ray's ``ray.data.llm`` vLLM processor; prompts arrive already rendered and tokenized.

    ``model_dir`` is passed through as given, s3:// included: in Ray 2.60 the vLLM engine stage
    downloads a remote ``model_source`` itself in each actor (``download_model_files`` ->
    a boto3 client, which honours AWS_ENDPOINT_URL[_S3]; a per-node file lock, cached under
    the node's model cache), so the driver never fetches the weights.

    Top-k (``logprobs_top_k``): ``SamplingParams(logprobs=k)``. Ray 2.60's vLLM stage copies
    ``output.outputs[0].logprobs`` into the row as ``logprobs`` (``vLLMOutputData``: one
    ``{token_id: {logprob, rank, decoded_token}}`` per generated token, k entries plus the
    sampled token when it is not among them); vLLM's default ``logprobs_mode=raw_logprobs``
    makes them the temperature-1 log-softmax of the raw logits, as the transformers engine
    stores. The int-keyed dicts do not convert to Arrow, so Ray Data pickles the stage's
    ``__data`` column between the engine and our postprocess (it logs "Failed to convert
    column '__data' ... falling back to serialize as pickled python objects"); the postprocess
    (:func:`vllm_result`) turns them into the plain ``topk_ids`` / ``topk_logprobs`` list
    columns, so everything downstream is Arrow again.
    """
    import os

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from sd2_ray.runtime import worker_env

    tp = config.tensor_parallel_size
    bundle = {"CPU": config.cpus_per_actor, **({"GPU": config.gpus_per_actor} if config.gpus_per_actor else {})}
    engine_kwargs = {"dtype": config.dtype, "tensor_parallel_size": tp, "seed": config.seed,
                     "trust_remote_code": config.trust_remote_code,
                     **({} if config.gpus_per_actor else {"enforce_eager": True}),
                     # vLLM refuses more log-probs per token than max_logprobs (default 20)
                     **({"max_logprobs": config.logprobs_top_k} if config.logprobs_top_k > 20 else {}),
                     **config.vllm_engine_kwargs}
    env = worker_env()
    if not config.gpus_per_actor:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    processor_config = vLLMEngineProcessorConfig(
        model_source=model_dir, engine_kwargs=engine_kwargs, concurrency=config.actors,
        batch_size=config.batch_size, chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False, should_continue_on_error=True, runtime_env={"env_vars": env},
        placement_group_config={"bundles": [bundle] * tp})
    sampling = {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_new_tokens}
    if config.temperature > 0:
        sampling["seed"] = config.seed
    if config.logprobs_top_k:  # per generated token: the top-k of the raw (temperature-1) log-probs
        sampling["logprobs"] = config.logprobs_top_k
    return build_processor(
        processor_config,
        preprocess=lambda row: {"index": row["index"], "shard": row["shard"], "prompt": row["prompt_text"],
                                "tokenized_prompt": list(row["prompt_ids"]), "sampling_params": dict(sampling)},
        postprocess=lambda row: vllm_result(row, eos_ids, config.max_new_tokens, config.logprobs_top_k))


def vllm_result(row: dict[str, Any], eos_ids: list[int], max_new_tokens: int, top_k: int = 0) -> dict[str, Any]:
    """A vLLM output row in the engines' result schema (errors included)."""
    error = row.get("__inference_error__") or None
    tokens = [int(t) for t in (row.get("generated_tokens") if row.get("generated_tokens") is not None else [])]
    kept, reason = split_at_eos(tokens, eos_ids, max_new_tokens)
    response_ids = None if error else with_stop_token(tokens, kept)
    out = {"index": int(row["index"]), "shard": int(row["shard"]),
           "response": None if error else row.get("generated_text", ""),
           "finish_reason": None if error else reason, "response_tokens": 0 if error else len(kept),
           "error": error, "response_ids": response_ids}
    if top_k:
        ids, logprobs = (None, None) if error else vllm_topk(row.get("logprobs"), top_k, len(response_ids))
        out["topk_ids"] = None if ids is None else ids.tolist()
        out["topk_logprobs"] = None if logprobs is None else logprobs.tolist()
    return out


def apply_engine(ds, model_dir: str, config, eos_ids: list[int]):
    """The configured engine as a Ray Data stage over request rows."""
    if config.engine == "vllm":
        return vllm_processor(model_dir, config, eos_ids)(ds)
    return apply_transformers(ds, model_dir, config)
