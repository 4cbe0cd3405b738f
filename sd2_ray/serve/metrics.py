"""Speculative-decoding metrics of a serving replica.

Two views of the same counters: exported counters (the serve app passes Ray's
``ray.util.metrics.Counter``s, exported to Prometheus by Ray, named like vLLM's
``spec_decode_*`` counters; :data:`COUNTERS` describes them) and an in-process summary
served as JSON at ``/v1/spec_stats``. Batching counters (batches, requests per batch, target
forward calls) show whether concurrent requests really shared forward passes.

The acceptance counters carry a ``category`` label: the task category a request names in its
metadata, when it is one of the configured categories (``metric_categories``); any other is
``other`` and none is ``uncategorized``, so a client can never grow the label set (each label
value is a Prometheus series per replica).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sd2_ray.specdec.types import SpecStats

log = logging.getLogger(__name__)

PREFIX = "sd2_spec_decode_"
OTHER, UNCATEGORIZED = "other", "uncategorized"
COUNTERS = {  # name -> (description, tag keys)
    "num_drafts": ("verification passes that checked a draft", ("model", "category")),
    "num_draft_tokens": ("tokens proposed by the drafter", ("model", "category")),
    "num_accepted_tokens": ("draft tokens accepted by the target", ("model", "category")),
    "target_passes": ("target verification forward passes (per request)", ("model", "category")),
    "committed_tokens": ("tokens committed by verification passes, bonus included", ("model", "category")),
    "batches": ("engine batches run (requests sharing forward passes)", ("model",)),
    "num_accepted_tokens_per_pos": (
        "accepted draft tokens by draft position",
        ("model", "category", "position"),
    ),
}


def category_label(category: str | None, allowed: frozenset[str]) -> str:
    """The metrics label of a request's category: itself when allowed, else ``other``."""
    if not category:
        return UNCATEGORIZED
    return category if category in allowed else OTHER


class SpecMetrics:
    def __init__(
        self,
        model_name: str,
        num_speculative_tokens: int,
        counters: dict[str, Any] | None = None,
        categories: list[str] | tuple[str, ...] = (),
    ):
        """``counters``: Prometheus-style counters by name (``inc(value, tags)``), e.g. Ray's from
        :func:`sd2_ray.serve.app.ray_counters`; None keeps only the JSON summary. ``categories``:
        the request categories that get a label of their own."""
        self.model_name = model_name
        self.allowed_categories = frozenset(categories)
        self.by_category: dict[str, SpecStats] = {}
        self.requests_by_category: dict[str, int] = {}
        self.num_speculative_tokens = num_speculative_tokens
        self.totals = SpecStats(
            num_speculative_tokens=num_speculative_tokens, accepted_per_position=[0] * num_speculative_tokens
        )
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.batches = self.batched_requests = self.max_batch_size_seen = 0
        self.batches_without_speculation = 0
        self.target_forward_calls = 0
        self.rejected_requests = 0
        self._lock = threading.Lock()  # forward hooks count from the engine thread
        self._counters = counters

    def record_request(
        self, stats: SpecStats, prompt_tokens: int, completion_tokens: int, category: str | None = None
    ) -> None:
        label = category_label(category, self.allowed_categories)
        with self._lock:
            self.totals = self.totals.merge(stats)
            self.by_category[label] = self.by_category.get(label, SpecStats()).merge(stats)
            self.requests_by_category[label] = self.requests_by_category.get(label, 0) + 1
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        if self._counters:
            tags = {"model": self.model_name, "category": label}
            values = {
                "num_drafts": stats.num_drafts,
                "num_draft_tokens": stats.num_draft_tokens,
                "num_accepted_tokens": stats.num_accepted_tokens,
                "target_passes": stats.target_passes,
                "committed_tokens": stats.committed_tokens,
            }
            for name, value in values.items():
                _inc(self._counters[name], value, tags)
            for pos, accepted in enumerate(stats.accepted_per_position):
                _inc(self._counters["num_accepted_tokens_per_pos"], accepted, {**tags, "position": str(pos)})

    def record_batch(self, size: int, speculative: bool = True) -> None:
        with self._lock:
            self.batches += 1
            self.batches_without_speculation += 0 if speculative else 1
            self.batched_requests += size
            self.max_batch_size_seen = max(self.max_batch_size_seen, size)
        if self._counters:
            _inc(self._counters["batches"], 1, {"model": self.model_name})

    def record_forward(self) -> None:
        with self._lock:
            self.target_forward_calls += 1

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected_requests += 1

    def summary(self) -> dict[str, Any]:
        with self._lock:
            t = self.totals
            return {
                "model": self.model_name,
                "replica_pid": os.getpid(),
                "num_speculative_tokens": self.num_speculative_tokens,
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "target_passes": t.target_passes,
                "num_drafts": t.num_drafts,
                "num_draft_tokens": t.num_draft_tokens,
                "num_accepted_tokens": t.num_accepted_tokens,
                "committed_tokens": t.committed_tokens,
                "acceptance_rate": round(t.acceptance_rate, 4),
                "mean_accepted_length": round(t.mean_accepted_length, 4),
                "accepted_per_position": list(t.accepted_per_position),
                "per_position_acceptance": [round(p, 4) for p in t.per_position_acceptance()],
                "batches": self.batches,
                "batches_without_speculation": self.batches_without_speculation,
                "batched_requests": self.batched_requests,
                "max_batch_size_seen": self.max_batch_size_seen,
                "mean_batch_size": round(self.batched_requests / self.batches, 3) if self.batches else 0.0,
                "target_forward_calls": self.target_forward_calls,
                "rejected_requests": self.rejected_requests,
                "categories": {
                    label: {
                        "requests": self.requests_by_category[label],
                        "acceptance_rate": round(c.acceptance_rate, 4),
                        "mean_accepted_length": round(c.mean_accepted_length, 4),
                        "per_position_acceptance": [round(p, 4) for p in c.per_position_acceptance()],
                    }
                    for label, c in sorted(self.by_category.items())
                },
            }


def _inc(counter, value: int, tags: dict) -> None:
    """Ray counters reject increments <= 0; a metrics hiccup must never fail a request."""
    if value > 0:
        try:
            counter.inc(value, tags)
        except Exception as err:  # noqa: BLE001
            log.warning("metrics: %s", err)


def watch_forward_calls(model, metrics: SpecMetrics):
    """Count the target's forward passes (batched or not) with a hook on its input embeddings,
    which every forward pass of a decoder runs exactly once, whichever entry point is used."""
    embeddings = model.get_input_embeddings()
    return embeddings.register_forward_hook(lambda *_: metrics.record_forward())
