"""Ray start-up shared by every stage's adapter: join a cluster if there is one, else start
the embedded local Ray. Imported lazily: the pure cores never import Ray."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Passed to every Ray worker so S3 endpoints, offline hub and thread limits match the driver.
PROPAGATED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
                  "SD2_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def ensure_ray(num_cpus: int | None = None, attempts: int = 2):
    """``ray.init`` once: the cluster in ``RAY_ADDRESS`` (a submitted job), else a local one.

    A local start is retried: on a saturated machine the raylet can miss Ray's fixed
    registration deadline, and a second start then usually succeeds.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": worker_env()}, log_to_driver=True)
        return ray
    # A private local cluster: token auth only gets in the way of the embedded default.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": worker_env()},
                     log_to_driver=True)
            break
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            log.warning("local Ray did not start in time (busy machine?); retrying")
            ray.shutdown()
    log.info("ray: %s", ray.cluster_resources())
    return ray


def run_with_gpus(fn, gpus: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` here when ``gpus`` is 0, else as one Ray task holding that many
    GPUs (the caller, e.g. a driver on a GPU-less head or a Tune trial, has none to give)."""
    if gpus <= 0:
        return fn(*args, **kwargs)
    ray = ensure_ray()
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(fn)
    return ray.get(task.remote(*args, **kwargs))


def in_ray_job() -> bool:
    """True when running as a Ray job (``ray job submit``) or with Ray already up."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()
