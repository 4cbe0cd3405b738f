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


def ensure_ray(num_cpus: int | None = None):
    """``ray.init`` once: the cluster in ``RAY_ADDRESS`` (a submitted job), else a local one."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    else:
        # A private local cluster: token auth only gets in the way of the embedded default.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": worker_env()},
                 log_to_driver=True)
    log.info("ray: %s", ray.cluster_resources())
    return ray


def in_ray_job() -> bool:
    """True when running as a Ray job (``ray job submit``) or with Ray already up."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()
