"""Ray start-up and remote calls shared by every stage's adapter (a Ray adapter itself: the pure
cores never import this). Joins the cluster of a submitted job or a local `ray start`, else
starts a private local Ray bound to loopback; runs work as Ray tasks holding GPUs; turns a
remote failure back into the one-line error the stage raised."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Passed to every Ray worker so S3 endpoints, offline hub and thread limits match the driver.
PROPAGATED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "SD2_CACHE_DIR",
    "SD2_KIT_DIR",
    "TORCH_EXTENSIONS_DIR",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "OMP_NUM_THREADS",
    "SD2_VERBOSE",
    "SD2_SHARED_STORAGE",
)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver


def worker_env() -> dict[str, str]:
    """The driver's environment every worker needs (S3 endpoint, offline hub, caches)."""
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def job_runtime_env() -> dict[str, Any]:
    """The submitted job's own runtime env (empty outside a submitted job)."""
    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return {}
    return job.get("runtime_env") or {}


def driver_runtime_env() -> dict[str, Any]:
    """The runtime env ``ray.init`` adds: only what the job's runtime env lacks. Ray refuses to
    merge a job's runtime env with the driver's when both set a key, even to the same value."""
    job = job_runtime_env()
    env = {k: v for k, v in worker_env().items() if k not in (job.get("env_vars") or {})}
    out: dict[str, Any] = {"env_vars": env} if env else {}
    if "worker_process_setup_hook" not in job:
        out["worker_process_setup_hook"] = "sd2_ray.logs.quiet_worker"  # the libraries' chatter, per worker
    return out


def local_cluster_address() -> str | None:
    """The address of a cluster started by `ray start` on this machine (what a bare ``ray.init()``
    would join), if its GCS answers; a stale address file (a killed cluster) is ignored."""
    temp = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    try:
        with open(os.path.join(temp, "ray", "ray_current_cluster")) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return address
    except (OSError, ValueError):
        log.warning(
            "ignoring %s: no Ray cluster answers at %s (left by a killed `ray start`?)",
            os.path.join(temp, "ray", "ray_current_cluster"),
            address,
        )
        return None


def ensure_ray(num_cpus: int | None = None, attempts: int = 2, dashboard: bool = False):
    """``ray.init`` once: the cluster in ``RAY_ADDRESS`` (a submitted job), else a cluster started
    by `ray start` on this machine (said so in the log), else a private local one.

    A local start is retried: on a saturated machine the raylet can miss Ray's fixed
    registration deadline, and a second start then usually succeeds.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    address = os.environ.get("RAY_ADDRESS") or local_cluster_address()
    if address and address != "local":
        log.info(
            "ray: joining the cluster at %s%s",
            address,
            ""
            if os.environ.get("RAY_ADDRESS")
            else " (started by `ray start` here; RAY_ADDRESS=local starts a private one instead)",
        )
        ray.init(address=address, runtime_env=driver_runtime_env(), log_to_driver=True)
        return ray
    # A private local cluster: token auth only gets in the way of the embedded default. (Its
    # gRPC servers still listen on every interface: Ray 2.60 binds them to 0.0.0.0 whatever
    # node IP it is given; the served HTTP endpoint binds to the configured host.)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                runtime_env=driver_runtime_env(),
                log_to_driver=True,
            )
            break
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            log.warning("local Ray did not start in time (busy machine?); retrying")
            ray.shutdown()
    log.info("ray: private local cluster %s", ray.cluster_resources())
    return ray


SHARED_STORAGE_ENV = "SD2_SHARED_STORAGE"  # "1": local paths are on a disk every node sees
_shared_storage = {"declared": False}  # set by a run whose config declares it (its stages check too)


def disconnect_quietly() -> None:
    """Leave Ray now, if this process joined or started it: the log monitor flushes the workers'
    deduplicated lines ("[repeated 3x across cluster]", progress bars) at shutdown, so a closing
    summary printed after this is the last thing on the terminal, not followed by them."""
    import sys

    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _close_stale_progress_bars()
    sys.stderr.flush()


def _close_stale_progress_bars() -> None:
    """A worker that exits right after closing its progress bar can lose the closing line; Ray's
    driver-side bar manager then keeps the bar and redraws it around every later print and at
    exit. Ray 2.60 has no public call to drop them, hence its manager's attributes here."""
    import sys

    tqdm_ray = sys.modules.get("ray.experimental.tqdm_ray")
    manager = getattr(tqdm_ray, "_manager", None)
    if manager is None:
        return
    with manager.lock:
        for group in manager.bar_groups.values():
            for bar in group.bars_by_uuid.values():
                bar.bar.leave = False  # erased, not printed once more
                bar.bar.close()
            group.bars_by_uuid.clear()


def declare_shared_storage() -> None:
    _shared_storage["declared"] = True


def spans_nodes() -> bool:
    """True when work may run on another node than this driver's: several live nodes, or a
    cluster whose live nodes hold no CPU (the autoscaler adds workers for the work)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) > 1 or not any(n.get("Resources", {}).get("CPU") for n in alive)


def require_reachable(path: str, field: str = "output", shared: bool = False) -> None:
    """A local ``path`` on a cluster of several nodes lands on whichever node wrote it, where
    no other stage finds it: refused in one line, unless the disk is declared shared."""
    import ray

    from sd2_ray import storage
    from sd2_ray.errors import ConfigError

    shared = shared or _shared_storage["declared"] or os.environ.get(SHARED_STORAGE_ENV) == "1"
    if storage.is_s3(path) or shared or not ray.is_initialized():
        return
    if spans_nodes():
        raise ConfigError(
            f"field '{field}': {path} is a local path, but this Ray cluster spans several nodes "
            f"that do not share a disk; use an s3:// prefix (or, for a shared disk such as "
            f"NFS, set shared_storage: true / {SHARED_STORAGE_ENV}=1)"
        )


def unwrap_remote_error(err: Exception) -> Exception:
    """The exception a Ray task raised, without Ray's wrapper: our one-line errors stay one line
    (the CLI prints them and exits 2), anything else keeps its type and last message line."""
    from sd2_ray.errors import Sd2Error

    cause = err.as_instanceof_cause() if hasattr(err, "as_instanceof_cause") else err
    for candidate in (getattr(err, "cause", None), cause):
        if isinstance(candidate, Sd2Error):
            for base in type(candidate).__mro__:
                if base.__module__.startswith("sd2_ray"):
                    return base(str(candidate).strip().splitlines()[-1])
    return err


# A task lost with its node (spot capacity, a dead raylet) runs again elsewhere; an error the
# task itself raised is not retried (Ray's retry_exceptions stays off).
SYSTEM_FAILURE_RETRIES = 3


def _remote(fn: Callable, gpus: float, num_cpus: float = 1, resources: dict[str, float] | None = None):
    ray = ensure_ray()
    # Not captured by the caller's placement group (a Tune trial's is CPU-only): the task asks
    # the cluster for its own GPUs and node type.
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(placement_group=None)
    return ray.remote(
        num_cpus=num_cpus,
        num_gpus=gpus,
        resources=dict(resources or {}),
        max_retries=SYSTEM_FAILURE_RETRIES,
        scheduling_strategy=strategy,
    )(fn)


def run_with_gpus(fn: Callable, gpus: float, *args, resources: dict[str, float] | None = None, **kwargs):
    """``fn(*args, **kwargs)`` here when ``gpus`` is 0 and no node type is asked for, else as one
    Ray task holding that many GPUs on a node with ``resources`` (the caller, e.g. a driver on a
    GPU-less head or a Tune trial, has none to give)."""
    if gpus <= 0 and not resources:
        return fn(*args, **kwargs)
    return submit_with_gpus(fn, gpus, *args, resources=resources, **kwargs).result()


RESOURCE_WAIT_ENV = "SD2_RESOURCE_WAIT_S"
DEFAULT_RESOURCE_WAIT_S = 1800.0  # an autoscaler brings a GPU node up in minutes, not half an hour


def resource_wait_s() -> float:
    """How long work may wait for a node that can hold it before the stage fails, saying so."""
    return float(os.environ.get(RESOURCE_WAIT_ENV) or DEFAULT_RESOURCE_WAIT_S)


def _shape(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"


def waiting_for_resources() -> str:
    """One line: the placement groups, tasks and actors waiting for resources now and what the
    cluster has free, e.g. to explain a stage that waits. Tasks and actors come from Ray's state
    API, which needs the dashboard (a private local Ray runs without one: groups only)."""
    import ray
    from ray.util.placement_group import placement_group_table

    waits: dict[str, int] = {}
    held = 0
    for group in placement_group_table().values():
        if group["state"] == "PENDING":
            key = "placement group " + "+".join(_shape(b) for b in group["bundles"].values())
            waits[key] = waits.get(key, 0) + 1
        elif group["state"] == "CREATED":
            held += 1
    for key in _pending_work():
        waits[key] = waits.get(key, 0) + 1
    free = {
        k: v
        for k, v in ray.available_resources().items()
        if not k.startswith(("node:", "bundle_group_")) and k not in ("memory", "object_store_memory")
    }
    pending = "; ".join(f"{n} x {k}" for k, n in waits.items()) or "nothing pending"
    return f"waiting: {pending}; free: {_shape(free)}; placement groups held: {held}"


def _pending_work() -> list[str]:
    import ray
    from ray.util.state import list_actors, list_tasks

    address = ray.get_runtime_context().gcs_address  # not "auto": other Ray sessions may run here
    try:
        tasks = list_tasks(
            address=address,
            filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")],
            detail=True,
            limit=1000,
            raise_on_missing_output=False,
            timeout=10,
        )
        actors = list_actors(
            address=address,
            filters=[("state", "=", "PENDING_CREATION")],
            detail=True,
            limit=1000,
            raise_on_missing_output=False,
            timeout=10,
        )
    except Exception:  # noqa: BLE001 - no dashboard (a private local Ray): the groups say enough
        return []
    return [f"task {t.name} {_shape(t.required_resources or {})}" for t in tasks] + [
        f"actor {a.class_name} {_shape(a.required_resources or {})}" for a in actors
    ]


class RemoteResult:
    """A submitted task; ``result()`` waits and raises the task's own error, unwrapped. A task
    that no node can take for ``resource_wait_s()`` (none fits, none is added) fails in one line
    naming what it asked for, instead of waiting silently."""

    def __init__(self, ref):
        self.ref = ref

    def result(self):
        import ray

        began = time.monotonic()
        while not ray.wait([self.ref], timeout=5.0)[0]:
            if time.monotonic() - began > resource_wait_s() and self._unscheduled():
                from sd2_ray.errors import Sd2Error

                raise Sd2Error(
                    f"no node could take a task for {time.monotonic() - began:.0f} s "
                    f"({waiting_for_resources()}); add nodes of the type it asks for, lower "
                    f"its resources, or raise {RESOURCE_WAIT_ENV}"
                )
        try:
            return ray.get(self.ref)
        except ray.exceptions.RayTaskError as err:
            raise unwrap_remote_error(err) from None

    def _unscheduled(self) -> bool:
        """True only when Ray's state API says the task still waits for a node (a running task,
        however long, is never failed; without the state API nothing is)."""
        import ray
        from ray.util.state import get_task

        try:
            task = get_task(self.ref.task_id().hex(), address=ray.get_runtime_context().gcs_address, timeout=10)
        except Exception:  # noqa: BLE001 - no dashboard: unknown, keep waiting
            return False
        states = [t.state for t in (task if isinstance(task, list) else [task]) if t is not None]
        return bool(states) and all(s == "PENDING_NODE_ASSIGNMENT" for s in states)


def submit_with_gpus(
    fn: Callable, gpus: float, *args, num_cpus: float = 1, resources: dict[str, float] | None = None, **kwargs
) -> RemoteResult:
    """Start ``fn`` as a Ray task holding ``gpus`` GPUs (may be 0) and ``resources`` without waiting."""
    return RemoteResult(_remote(fn, gpus, num_cpus, resources).remote(*args, **kwargs))


def in_ray_job() -> bool:
    """True when running as a Ray job (``ray job submit``) or with Ray already up."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def actor_pool_args(settings) -> dict[str, Any]:
    """``map_batches`` arguments of a stage's actor pool of model replicas (``settings``: the
    fields ``actors``, ``cpus_per_actor``, ``gpus_per_actor``, ``node_resources`` and
    ``max_restarts``, as distill's and the feature stream's). The actors get the driver's storage
    environment (AWS_*, SD2_CACHE_DIR), so they reach the same S3 endpoint even when Ray was
    started before it was set; a lost actor is restarted and its batches retried."""
    import ray

    return {
        "compute": ray.data.ActorPoolStrategy(size=settings.actors),
        "num_cpus": settings.cpus_per_actor,
        "num_gpus": settings.gpus_per_actor or None,
        "resources": settings.node_resources or None,
        "runtime_env": {"env_vars": worker_env()},
        "max_restarts": settings.max_restarts,
        "max_task_retries": -1 if settings.max_restarts != 0 else 0,
    }
