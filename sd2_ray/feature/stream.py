"""The Ray Data adapter of feature streaming: distilled rows -> an actor pool running the target
(:class:`sd2_ray.feature.extract.FeatureExtractor`) -> feature rows, handed to Ray Train as its
``train`` dataset and split over the workers, so each row's features are computed once per epoch
and reach exactly one worker.

Nothing is written: the features live in Ray's object store only while they stream (Ray Data's
backpressure bounds how many batches are in flight). A lost actor is restarted and its batches
retried (``max_restarts``; Ray Data's actor pool). ``cache`` opts in to writing them once as
Parquet (local or s3://) and reading that back on later epochs and reruns; ``materialize``
computes them all into the object store first (the baseline streaming is measured against).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from sd2_ray import storage

log = logging.getLogger(__name__)

CACHE_DONE = "_COMPLETE"  # written last into a cache dir: a cache without it is recomputed


def feature_dataset(rows, target_dir: str, stream, extract: dict[str, Any]):
    """Feature rows of the Ray dataset ``rows`` (distilled rows), computed by ``stream.actors``
    target actors (``stream``: :class:`sd2_ray.feature.config.FeatureStreamSettings`; ``extract``:
    :class:`sd2_ray.feature.extract.ExtractSettings` as a dict)."""
    if stream.cache and cache_complete(stream.cache):
        log.info("features: reading the cache %s", stream.cache)
        return read_cache(stream.cache)
    # The rows (text, small) are read into the object store now, in actor-batch blocks: once
    # training starts, its workers and the feature actors may hold every CPU of the cluster, and
    # read tasks would then wait forever; only the target's features stream.
    rows = rows.repartition(target_num_rows_per_block=stream.batch_size).materialize()
    features = apply_extractor(rows, target_dir, stream, extract)
    if stream.cache:
        write_cache(features, stream.cache)
        return read_cache(stream.cache)
    return features


def apply_extractor(rows, target_dir: str, stream, extract: dict[str, Any]):
    """The actor pool stage (the same placement fields as distill's transformers actors)."""
    from sd2_ray.feature.extract import FeatureExtractor
    from sd2_ray.runtime import actor_pool_args

    with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return rows.map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={"model_dir": target_dir, "settings": extract},
            batch_size=stream.batch_size,
            batch_format="pyarrow",
            **actor_pool_args(stream),
        )


def warn_if_cpus_run_short(train_cpus: float, stream) -> None:
    """Training workers and feature actors run at once: when together they ask for more CPUs than
    the cluster has (and it does not grow), the stream waits forever for its actors."""
    import ray

    wanted = train_cpus + stream.actors * stream.cpus_per_actor
    total = ray.cluster_resources().get("CPU", 0)
    if not stream.gpus_per_actor and wanted > total:
        log.warning(
            "finetune: the training workers and the feature actors ask for %g CPUs, the cluster has %g: "
            "unless it scales up, the feature stream waits forever (lower feature_head.stream.cpus_per_actor, "
            "cpus_per_worker or workers)",
            wanted,
            total,
        )


def cache_complete(path: str) -> bool:
    return storage.exists(storage.join(path, CACHE_DONE))


def write_cache(features, path: str) -> None:
    """The feature rows as Parquet under ``path``, marked complete last (a partial write is redone)."""
    storage.delete(path)
    fs, inner = storage.filesystem(path)
    features.write_parquet(inner, filesystem=fs)
    storage.write_text(storage.join(path, CACHE_DONE), "")
    log.info("features: cached in %s", path)


def read_cache(path: str):
    import ray.data

    fs, inner = storage.filesystem(path)
    # a fraction of a CPU: the cache is read while training workers may hold every whole one
    return ray.data.read_parquet(inner, filesystem=fs, file_extensions=["parquet"], ray_remote_args={"num_cpus": 0.25})
