"""The ``vllm`` engine: Ray Serve LLM (``ray.serve.llm``) with vLLM's draft-model speculative
decoding, behind the same routes as our engine (OpenAI /v1, /health, /v1/spec_stats, API key).

The model deployment is Ray's own (``build_llm_deployment(LLMConfig)``). The ingress is Ray's
``OpenAiIngress`` assembled the way ``build_openai_app`` assembles it, plus an API-key check
and two routes (/health, /v1/spec_stats): ``build_openai_app`` itself accepts a custom ingress
class but no extra routes, so its few assembly lines are mirrored in :func:`build_vllm_app`.
Imported only when ``engine: vllm`` (it imports vLLM through Ray LLM).
"""

import json
from typing import Any

from fastapi import Request
from ray import serve
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from sd2_ray import storage
from sd2_ray.serve.config import ServeConfig
from sd2_ray.serve.http import check_api_key, error_response
from sd2_ray.serve.openai_schema import OpenAIError

ENDPOINTS = {  # Ray's OpenAI routes we serve (its DEFAULT_ENDPOINTS add embeddings, audio, ...) + ours
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
    "spec_stats": lambda app: app.get("/v1/spec_stats"),
}


class Sd2VllmIngress(OpenAiIngress):
    """Ray's OpenAI ingress with our API-key check, /health and /v1/spec_stats."""

    def __init__(
        self, llm_deployments, model_cards, *, api_key: str | None = None, speculative: dict | None = None, **kwargs
    ):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._api_key = api_key
        self._speculative = speculative

    def _denied(self, request: Request):
        try:
            check_api_key(request, self._api_key)
        except OpenAIError as err:
            return error_response(err)
        return None

    async def models(self, request: Request):
        return self._denied(request) or await super().models()

    async def model_data(self, model: str, request: Request):
        return self._denied(request) or await super().model_data(model)

    async def completions(self, body: CompletionRequest, request: Request):
        return self._denied(request) or await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        return self._denied(request) or await super().chat(body, request)

    async def health(self):
        return {"status": "ok", "engine": "vllm", "models": sorted(self._model_cards)}

    async def spec_stats(self, request: Request):
        # vLLM counts acceptance itself and Ray exports it (vllm:spec_decode_* on /metrics).
        return self._denied(request) or {
            "engine": "vllm",
            "speculative_config": self._speculative,
            "metrics": "Prometheus: vllm:spec_decode_num_drafts, vllm:spec_decode_num_accepted_tokens, ...",
        }


def context_length(config: ServeConfig) -> int:
    """max_model_len: as configured, else the target's max_position_embeddings read from its
    config.json (an s3:// target too, one small GET); a ConfigError when neither is there."""
    if config.max_model_len:
        return config.max_model_len
    from sd2_ray.errors import ConfigError

    try:
        cfg = json.loads(storage.read_text(storage.join(config.target, "config.json")))
        return int((cfg.get("text_config") or cfg)["max_position_embeddings"])
    except Exception as err:  # noqa: BLE001 - one line naming the field, whatever the reason
        raise ConfigError(
            f"field 'max_model_len': not set, and {config.target}/config.json gives no "
            f"max_position_embeddings ({type(err).__name__})"
        ) from None


def drafter_source(config: ServeConfig) -> tuple[str | None, dict[str, Any]]:
    """(the path vLLM loads the drafter from, the callback that puts it there). vLLM reads a draft
    model from local disk only, and Ray Serve LLM downloads just the target: an s3:// drafter is
    fetched on each replica's node, before the engine starts, into the cache path every node
    shares (SD2_CACHE_DIR is passed to the replicas)."""
    if not config.drafter or not storage.is_s3(config.drafter):
        return config.drafter, {}
    callback = {
        "callback_class": "sd2_ray.serve.vllm_callbacks:FetchDrafter",
        "callback_kwargs": {"drafter": config.drafter},
    }
    return storage.cache_path(config.drafter), callback


def placement(config: ServeConfig) -> dict[str, Any]:
    """One replica's placement group: tensor_parallel_size GPU bundles on one node, or CPUs."""
    if config.accelerator == "cpu":
        return {"bundles": [{"CPU": config.num_cpus_per_replica, **config.node_resources}]}
    bundle = {"GPU": 1, "CPU": config.num_cpus_per_replica, **config.node_resources}
    return {"bundles": [bundle] * config.tensor_parallel_size, "strategy": "STRICT_PACK"}


def llm_config(config: ServeConfig) -> LLMConfig:
    """Ray Serve LLM config: target as the model, drafter as vLLM's speculative draft model;
    placement and engine settings from the config alone (this may run on a GPU-less head)."""
    target = config.target
    gpu = config.accelerator == "gpu"
    # our "auto" (bf16 on GPU, fp32 on CPU), not vLLM's (which turns fp32 weights into fp16)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if gpu else "float32")
    engine_kwargs: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": context_length(config),
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    else:
        engine_kwargs["enforce_eager"] = True  # torch.compile costs ~45 s of start-up on CPU
    drafter, callback = drafter_source(config)
    if drafter:
        engine_kwargs["speculative_config"] = {
            "model": drafter,
            "num_speculative_tokens": config.num_speculative_tokens,
        }
    source: Any = {"bucket_uri": target} if storage.is_s3(target) else target
    deployment: dict[str, Any] = {
        "max_ongoing_requests": config.max_batch_size + config.max_queued_requests,
        "max_queued_requests": config.max_queued_requests,
    }
    autoscaling = config.autoscaling_settings()
    if autoscaling is not None:
        deployment["autoscaling_config"] = autoscaling
    else:
        deployment["autoscaling_config"] = {"min_replicas": config.replicas, "max_replicas": config.replicas}
    from sd2_ray.runtime import worker_env

    kwargs: dict[str, Any] = {"placement_group_config": placement(config), "runtime_env": {"env_vars": worker_env()}}
    if callback:
        kwargs["callback_config"] = callback
    return LLMConfig(
        model_loading_config={"model_id": config.served_model_name, "model_source": source},
        engine_kwargs=engine_kwargs,
        deployment_config=deployment,
        **kwargs,
    )


def model_card(llm: LLMConfig):
    """The /v1/models entry Ray's ingress serves. Ray builds it with a function it does not export
    (its own build_openai_app does the same); the one private import of the serving path."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return to_model_metadata(llm.model_id, llm)


def build_vllm_app(config: ServeConfig) -> "serve.Application":
    llm = llm_config(config)
    server = build_llm_deployment(llm)
    ingress = make_fastapi_ingress(Sd2VllmIngress, endpoint_map=ENDPOINTS)
    options = Sd2VllmIngress.get_deployment_options([llm])
    return serve.deployment(ingress, **options).bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: model_card(llm)},
        api_key=config.api_key,
        speculative=llm.engine_kwargs.get("speculative_config"),
    )
