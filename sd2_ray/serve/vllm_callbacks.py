"""Ray Serve LLM node-initialisation callback (an adapter of ``ray.serve.llm``): fetch an s3://
drafter onto the replica's node before vLLM starts, where :func:`sd2_ray.serve.vllm_app.drafter_source`
told vLLM to find it. Ray runs the hook once per node of the replica's placement group."""

from __future__ import annotations

import logging

from ray.llm._internal.common.callbacks.base import CallbackBase

log = logging.getLogger(__name__)


class FetchDrafter(CallbackBase):
    """``callback_kwargs``: ``drafter`` (the s3:// model dir)."""

    def on_before_download_model_files_distributed(self) -> None:
        from sd2_ray import storage

        local = storage.local_dir(self.kwargs["drafter"])  # once per node: a file lock, an atomic rename
        log.info("drafter %s on this node at %s", self.kwargs["drafter"], local)
