"""Ray Serve application: an OpenAI-compatible endpoint over target + drafter.

``build_app(config)`` picks the engine: ``transformers`` -> :class:`SpecDecodeServer` below
(our speculative engine; Ray Serve's ``@serve.batch`` groups concurrent requests so they share
forward passes), ``vllm`` -> Ray Serve LLM (see :mod:`sd2_ray.serve.vllm_app`). Both answer the
same routes. ``app_builder(args)`` is the import path for ``serve run``/``serve deploy`` and
KubeRay: ``sd2_ray.serve.app:app_builder`` with ``args`` = ServeConfig fields.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

from sd2_ray.serve import core, images
from sd2_ray.serve import openai_schema as oa
from sd2_ray.serve.batching import Delta, Job, run_batch
from sd2_ray.serve.config import ServeConfig
from sd2_ray.serve.http import check_api_key, install_error_handlers, queue_full
from sd2_ray.serve.metrics import COUNTERS, PREFIX, SpecMetrics, watch_forward_calls

log = logging.getLogger("sd2_ray.serve")

api = install_error_handlers(FastAPI(title="sd2-ray", description="OpenAI-compatible speculative decoding"))


def load_engine(config: ServeConfig):
    """(engine, target model, target tokenizer) for the configured pair, via our engine; a
    vision-language target gets the engine that puts images in place (:mod:`sd2_ray.serve.images`)."""
    from sd2_ray.models.device import resolve_device, resolve_dtype
    from sd2_ray.specdec.engine import SpeculativeEngine

    device = resolve_device(config.device)  # in the replica: the GPUs Ray gave it
    if images.is_vision_target(config.target):
        return images.load_vision_engine(config, device, resolve_dtype(config.dtype, device))
    engine = SpeculativeEngine.from_dirs(
        config.target,
        config.drafter,
        config.num_speculative_tokens,
        dtype=resolve_dtype(config.dtype, device),
        device=device,
        device_map=config.device_map,
        compile=config.compile,
    )
    return engine, engine.target, engine.target_tokenizer


def _import(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def ray_counters() -> dict:
    """The replica's counters as Ray metrics (Ray exports them to Prometheus)."""
    from ray.util.metrics import Counter

    return {name: Counter(PREFIX + name, description=desc, tag_keys=tags) for name, (desc, tags) in COUNTERS.items()}


# Chunk builders sit above the class: Serve pickles the class with the globals defined so far.
def _role_chunk(request_id, created, model):
    choice = oa.ChatChunkChoice(delta=oa.ChatDelta(role="assistant", content=""))
    return oa.ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])


def _chat_chunk(request_id, created, model, delta: Delta):
    choice = oa.ChatChunkChoice(delta=oa.ChatDelta(content=delta.text or None), finish_reason=delta.finish_reason)
    return oa.ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])


def _completion_chunk(request_id, created, model, delta: Delta):
    return oa.CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[oa.CompletionChoice(text=delta.text, finish_reason=delta.finish_reason)],
    )


def _usage_chunk(request_id, created, model, usage: oa.Usage, chat: bool):
    cls = oa.ChatCompletionChunk if chat else oa.CompletionResponse
    return cls(id=request_id, created=created, model=model, choices=[], usage=usage)


@serve.deployment(name="SpecDecodeServer")
@serve.ingress(api)
class SpecDecodeServer:
    """One replica: the engine (target + drafter), a bounded admission count, batched decoding."""

    def __init__(self, config: dict, engine_factory: str | None = None):
        import torch

        self.config = cfg = ServeConfig.model_validate(config)
        torch.set_num_threads(max(1, int(cfg.num_cpus_per_replica)))
        factory = _import(engine_factory) if engine_factory else load_engine
        self.engine, target, self.tokenizer = factory(cfg)
        self.model_name = cfg.served_model_name
        self.max_model_len = core.context_length(target.config, cfg.max_model_len)
        self.vocab_size = int(target.config.vocab_size)
        self.vision = images.image_policy(self.engine, self.tokenizer, cfg)  # None: a text-only target
        self.metrics = SpecMetrics(
            self.model_name,
            cfg.num_speculative_tokens if cfg.drafter else 0,
            counters=ray_counters(),
            categories=cfg.metric_categories,
        )
        self._hook = watch_forward_calls(target, self.metrics)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd2-engine")
        self.capacity = cfg.max_batch_size + cfg.max_queued_requests
        self.in_flight = 0
        self.created = oa.now()
        self._generate_batch.set_max_batch_size(cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        log.info(
            "serving '%s'%s (drafter %s, K=%d) context %d, batch <= %d, queue <= %d",
            self.model_name,
            " with images" if self.vision else "",
            cfg.drafter,
            cfg.num_speculative_tokens,
            self.max_model_len,
            cfg.max_batch_size,
            cfg.max_queued_requests,
        )

    # ---- routes ---------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "in_flight": self.in_flight}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        check_api_key(request, self.config.api_key)
        return oa.ModelList(data=[oa.ModelCard(id=self.model_name, created=self.created)]).model_dump()

    @api.get("/v1/spec_stats")
    async def spec_stats(self, request: Request) -> dict:
        check_api_key(request, self.config.api_key)
        return self.metrics.summary()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        check_api_key(request, self.config.api_key)
        req = oa.validate_request(oa.CompletionRequest, await request.body())
        core.check_model_name(req.model, self.model_name)
        prepared = core.prepare_completion(req, self.tokenizer, self.max_model_len, self.vocab_size, self.vision)
        return await self._answer(prepared, req, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        check_api_key(request, self.config.api_key)
        req = oa.validate_request(oa.ChatCompletionRequest, await request.body())
        core.check_model_name(req.model, self.model_name)
        args = (req, self.tokenizer, self.max_model_len, self.config.default_max_tokens, self.vision)
        if req.image_parts() and self.vision is not None:
            # decoding and preprocessing images (or fetching them) off the event loop, which
            # keeps streaming the running batch's tokens meanwhile
            prepared = await asyncio.to_thread(core.prepare_chat, *args)
        else:
            prepared = core.prepare_chat(*args)
        return await self._answer(prepared, req, chat=True)

    # ---- generation -----------------------------------------------------------------------

    # Placeholders: the decorator needs values when the class is defined, and __init__ sets the
    # configured max_batch_size / batch_wait_timeout_s through Ray Serve's setters for that.
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _generate_batch(self, jobs: list[Job]) -> AsyncIterator[list[Delta]]:
        """Requests that arrive together run as one engine batch (shared forward passes)."""
        limit = self.config.speculative_disable_by_batch_size
        speculate = limit is None or len(jobs) < limit
        self.metrics.record_batch(len(jobs), speculative=speculate)
        async for step in run_batch(self.engine, jobs, self.executor, speculate=speculate):
            yield step

    def _admit(self) -> None:
        if self.in_flight >= self.capacity:
            self.metrics.record_rejected()
            raise queue_full(self.capacity)
        self.in_flight += 1

    async def _answer(self, prepared: core.PreparedRequest, req, chat: bool):
        self._admit()
        job = Job(prepared, core.TextStream(self.tokenizer, prepared.stop))
        request_id = oa.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(
                self._stream(job, request_id, chat, req.include_usage_in_stream), media_type="text/event-stream"
            )
        try:
            text, final = "", None
            async for delta in self._generate_batch(job):
                text += delta.text
                final = delta if delta.finish_reason else final
        finally:
            job.cancelled = True  # a client that left (task cancelled) stops its decoding
            self.in_flight -= 1
        assert final is not None  # run_batch ends every request with a finish_reason
        if final.error:
            log.error("%s: generation failed: %s", request_id, final.error)
            raise oa.OpenAIError(f"generation failed: {final.error}", status=500, type="server_error")
        usage = self._finish(request_id, prepared, final)
        body: oa.ChatCompletionResponse | oa.CompletionResponse
        if chat:
            body = oa.ChatCompletionResponse(
                id=request_id,
                created=oa.now(),
                model=self.model_name,
                usage=usage,
                choices=[oa.ChatChoice(message=oa.AssistantMessage(content=text), finish_reason=final.finish_reason)],
            )
        else:
            body = oa.CompletionResponse(
                id=request_id,
                created=oa.now(),
                model=self.model_name,
                usage=usage,
                choices=[oa.CompletionChoice(text=text, finish_reason=final.finish_reason)],
            )
        return JSONResponse(body.model_dump())

    async def _stream(self, job: Job, request_id: str, chat: bool, include_usage: bool):
        created = oa.now()
        chunk = _chat_chunk if chat else _completion_chunk
        try:
            if chat:
                yield oa.sse(_role_chunk(request_id, created, self.model_name))
            async for delta in self._generate_batch(job):
                if delta.error:
                    log.error("%s: generation failed: %s", request_id, delta.error)
                    yield oa.sse(oa.error_body(f"generation failed: {delta.error}", "server_error"))
                    break
                if delta.text or delta.finish_reason:
                    yield oa.sse(chunk(request_id, created, self.model_name, delta))
                if delta.finish_reason:
                    usage = self._finish(request_id, job.request, delta)
                    if include_usage:
                        yield oa.sse(_usage_chunk(request_id, created, self.model_name, usage, chat))
            yield oa.SSE_DONE
        except Exception as err:  # headers are sent: report in-band, as OpenAI does
            log.exception("%s: stream failed", request_id)
            yield oa.sse(oa.error_body(f"internal error: {type(err).__name__}", "server_error"))
            yield oa.SSE_DONE
        finally:
            job.cancelled = True  # a client that left stops its decoding at the next step
            self.in_flight -= 1

    def _finish(self, request_id: str, prepared: core.PreparedRequest, final: Delta) -> oa.Usage:
        completion_tokens = len(final.token_ids)
        stats = final.stats
        assert stats is not None  # a finished request's last delta carries its stats
        self.metrics.record_request(stats, len(prepared.prompt_ids), completion_tokens, prepared.category)
        log.info(core.acceptance_log_line(request_id, len(prepared.prompt_ids), completion_tokens, stats))
        spec = core.spec_usage(stats) if self.config.drafter else None
        return oa.Usage(
            prompt_tokens=len(prepared.prompt_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(prepared.prompt_ids) + completion_tokens,
            spec_decode=spec,
        )


# ---- builders -------------------------------------------------------------------------------


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Replicas or autoscaling, and the admission bounds.

    The replica itself answers 503 (in OpenAI's shape) past ``max_batch_size +
    max_queued_requests``; Serve's own router queue is set wider so that requests reach the
    replica's check, and stays bounded as a backstop (its 503 is plain text)."""
    capacity = config.max_batch_size + config.max_queued_requests
    options: dict[str, Any] = {
        "max_ongoing_requests": 2 * capacity + 8,
        "max_queued_requests": capacity + 8,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica},
    }
    if config.gpus_per_replica > 0:
        options["ray_actor_options"]["num_gpus"] = config.gpus_per_replica
    if config.node_resources:
        options["ray_actor_options"]["resources"] = dict(config.node_resources)
    autoscaling = config.autoscaling_settings()
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = config.replicas
    return options


def build_app(config: ServeConfig, engine_factory: str | None = None) -> serve.Application:
    """The Serve application for ``config`` (not yet running: pass it to ``serve.run``).

    ``engine_factory`` ("module:function(config) -> (engine, target_model, tokenizer)") swaps
    the engine, e.g. for tests of the HTTP layer; by default our speculative engine is loaded.
    """
    # The key is read here, where the file and $SD2_API_KEY are; replicas on other nodes get it.
    config = config.model_copy(update={"api_key": config.effective_api_key(), "api_key_file": None})
    if config.engine == "vllm":
        from sd2_ray.serve.vllm_app import build_vllm_app

        return build_vllm_app(config)
    # @serve.deployment made the class a Deployment; mypy keeps a decorated class's own type
    deployment = SpecDecodeServer.options(**deployment_options(config))  # type: ignore[attr-defined]
    return deployment.bind(config.to_dict(), engine_factory)


def app_builder(args: dict) -> serve.Application:
    """Entry point for Serve config files / KubeRay (``import_path: sd2_ray.serve.app:app_builder``)."""
    from sd2_ray.config import validate

    return build_app(validate(ServeConfig, dict(args or {}), source="serve args"))
