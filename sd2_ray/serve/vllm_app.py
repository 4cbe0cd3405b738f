"""The ``vllm`` engine: Ray Serve LLM (``ray.serve.llm``) with vLLM's draft-model speculative
decoding, behind the same routes as our engine (OpenAI /v1, /health, /v1/spec_stats, API key).

The model deployment is Ray's own (``build_llm_deployment(LLMConfig)``). The ingress is Ray's
``OpenAiIngress`` assembled the way ``build_openai_app`` assembles it, plus an API-key check
and two routes (/health, /v1/spec_stats): ``build_openai_app`` itself accepts a custom ingress
class but no extra routes, so its few assembly lines are mirrored in :func:`build_vllm_app`.
Imported only when ``engine: vllm`` (it imports vLLM through Ray LLM).
"""
import json
import os
from typing import Any, Optional

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

    def __init__(self, llm_deployments, model_cards, *, api_key: Optional[str] = None,
                 speculative: Optional[dict] = None, **kwargs):
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
        return self._denied(request) or {"engine": "vllm", "speculative_config": self._speculative,
                                         "metrics": "Prometheus: vllm:spec_decode_num_drafts, "
                                                    "vllm:spec_decode_num_accepted_tokens, ..."}


def _context_length(config: ServeConfig, target_dir: str) -> int:
    if config.max_model_len:
        return config.max_model_len
    if storage.is_s3(target_dir):
        return 2048
    with open(os.path.join(target_dir, "config.json")) as f:
        return int(json.load(f).get("max_position_embeddings") or 2048)


def _local_or_s3(path: str) -> str:
    return path if storage.is_s3(path) else os.path.abspath(path)


def llm_config(config: ServeConfig) -> LLMConfig:
    """Ray Serve LLM config: target as the model, drafter as vLLM's speculative draft model."""
    import torch

    target = _local_or_s3(config.target)
    on_gpu = torch.cuda.is_available()
    # our "auto" (bf16 on GPU, fp32 on CPU), not vLLM's (which turns fp32 weights into fp16)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    engine_kwargs: dict[str, Any] = {"dtype": dtype, "max_model_len": _context_length(config, target)}
    if not on_gpu:
        engine_kwargs["enforce_eager"] = True  # torch.compile costs ~45 s of start-up on CPU
    speculative = None
    if config.drafter:
        speculative = {"model": _local_or_s3(config.drafter),
                       "num_speculative_tokens": config.num_speculative_tokens}
        engine_kwargs["speculative_config"] = speculative
    source: Any = {"bucket_uri": target} if storage.is_s3(target) else target
    deployment: dict[str, Any] = {"max_ongoing_requests": config.max_batch_size + config.max_queued_requests,
                                  "max_queued_requests": config.max_queued_requests}
    autoscaling = config.autoscaling_settings()
    if autoscaling is not None:
        deployment["autoscaling_config"] = autoscaling
    else:
        deployment["autoscaling_config"] = {"min_replicas": config.replicas, "max_replicas": config.replicas}
    kwargs: dict[str, Any] = {}
    if not on_gpu:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": config.num_cpus_per_replica}]}
    return LLMConfig(model_loading_config={"model_id": config.served_model_name, "model_source": source},
                     engine_kwargs=engine_kwargs, deployment_config=deployment, **kwargs)


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
        api_key=config.api_key, speculative=llm.engine_kwargs.get("speculative_config"))
