"""A smoke check of a served pair (the pipeline's last step): deploy it as an app of its own
(``sd2-smoke-<id>`` at ``/sd2-smoke-<id>``), send one greedy chat request through a Serve proxy
the way a client would, read the acceptance counters, delete that app and nothing else.

On a cluster Serve may already serve production (``clusters/serve-config.yaml`` names its app
``sd2``): the check reuses that Serve instance's HTTP port and proxies and never touches an app
it did not create. Proxies run only on the head and on nodes holding a replica, so the driver's
own node (a worker, for a submitted job) may have none: the check asks the Serve controller
where its proxies are instead of calling 127.0.0.1. Failures are one-line errors that say what
to change."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sd2_ray.errors import Sd2Error
from sd2_ray.serve.config import ServeConfig
from sd2_ray.serve.http import free_port

BASE_TIMEOUT_S = 180.0
SECONDS_PER_GB = 10.0  # loading weights from S3 and into the engine; 140 GB of 70B weights ~ 25 min
APP_PREFIX = "sd2-smoke-"
_HINT = "raise serve_smoke_timeout_s (large models load slowly) or set serve_smoke: false"


def weights_gb(*model_dirs: str | None) -> float:
    """Size of the models' safetensors files in GB, from the listing (s3:// too, nothing read)."""
    from sd2_ray import storage

    total = 0
    for path in model_dirs:
        if not path:
            continue
        fs, inner = storage.filesystem(path)
        import pyarrow.fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
        total += sum(i.size or 0 for i in infos if i.path.endswith(".safetensors"))
    return total / 1e9


def smoke_timeout(config: ServeConfig, timeout_s: float | None = None) -> float:
    """The given timeout, else 180 s plus 10 s per GB of weights to load."""
    return timeout_s or BASE_TIMEOUT_S + SECONDS_PER_GB * weights_gb(config.target, config.drafter)


def smoke_app_name() -> str:
    """A name no production app has: the check deletes exactly what it deployed."""
    return APP_PREFIX + uuid.uuid4().hex[:8]


def serve_smoke(config: ServeConfig, prompts: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Deploy the pair as its own app, send one greedy chat request through a proxy, delete the app."""
    from ray import serve

    from sd2_ray.rows import read_rows

    name = smoke_app_name()
    config = config.model_copy(update={"app_name": name})
    timeout_s = smoke_timeout(config, timeout_s)
    row = read_rows(prompts, limit=1)[0]
    began = time.perf_counter()
    try:
        deploy(config, route_prefix=f"/{name}")
        deadline = time.monotonic() + timeout_s
        wait_running(name, deadline)
        base = wait_healthy(f"/{name}", deadline, timeout_s)
        result = ask(config, f"{base}/v1", row, timeout_s)
    finally:
        if serve_running():  # a failed start leaves nothing to delete (and no controller to ask)
            serve.delete(name)  # ours only: the name is unique to this check
    return {**result, "app": name, "seconds": round(time.perf_counter() - began, 2)}


def deploy(config: ServeConfig, route_prefix: str) -> None:
    """Run the app without waiting for it (the wait is ours, bounded). Serve already running
    keeps its HTTP options and proxies; otherwise it is started: on one node on a free loopback
    port, on a cluster on every interface at the configured port (clients on other nodes)."""
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.job import check_gpus

    ray = ensure_ray()
    check_gpus(config, local=False)
    if not serve_running():
        alive = [n for n in ray.nodes() if n.get("Alive")]
        host, port = ("127.0.0.1", free_port()) if len(alive) <= 1 else ("0.0.0.0", config.port)
        serve.start(http_options={"host": host, "port": port})
    serve.run_many(
        [serve.RunTarget(build_app(config), name=config.app_name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


# Serve's public API (serve.status) names proxies by node id only; the controller's details hold
# their node IPs, the HTTP port and bind host, which a client needs. The dashboard's REST API
# serves the same details, but a driver need not know the dashboard's address.
def serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def _details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def proxy_urls() -> list[str]:
    """``http://host:port`` of every healthy HTTP proxy, from the Serve controller (its node's
    IP, the port it listens on): where a client would connect, not the driver's own node."""
    details = _details()
    http = details.get("http_options") or {}
    targets = []
    for group in details.get("target_groups") or []:
        if str(group.get("protocol", "")).upper().endswith("HTTP"):
            targets += [(t["ip"], t["port"]) for t in group.get("targets") or []]
    if not targets:  # no target groups reported: the healthy proxies' nodes, the configured port
        targets = [
            (p["node_ip"], http.get("port", 8000))
            for p in (details.get("proxies") or {}).values()
            if p.get("status") == "HEALTHY"
        ]
    urls = [f"http://{reachable(ip, http.get('host', '0.0.0.0'))}:{port}" for ip, port in targets]
    return list(dict.fromkeys(urls))


def reachable(node_ip: str, bind_host: str) -> str:
    """The address of a proxy on ``node_ip`` that listens on ``bind_host``: a proxy bound to one
    address (loopback, on a laptop) answers only there, so one on this machine is called at that
    address; a proxy on every interface is called at its node's IP."""
    import ray

    if bind_host in ("0.0.0.0", "::", "") or node_ip != ray.util.get_node_ip_address():
        return node_ip
    return "127.0.0.1" if bind_host == "localhost" else bind_host


def wait_running(name: str, deadline: float) -> None:
    """Until the app is RUNNING; a failed deploy or the deadline is a one-line error."""
    from ray import serve

    while True:
        app = serve.status().applications.get(name)
        status = str(app.status) if app else "NOT_STARTED"
        if status.endswith("RUNNING") and not status.endswith("NOT_RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            message = (app.message or "").strip().splitlines()
            raise Sd2Error(
                f"serve smoke check: app {name} {status.split('.')[-1]}: {message[-1] if message else 'no message'}"
            )
        if time.monotonic() > deadline:
            raise Sd2Error(
                f"serve smoke check: app {name} still {status.split('.')[-1]} at the deadline "
                f"(replicas not placed or not loaded); {_HINT}"
            )
        time.sleep(1.0)


def wait_healthy(prefix: str, deadline: float, timeout_s: float) -> str:
    """The first proxy URL + ``prefix`` whose ``/health`` answers 200. Asked afresh each round:
    a proxy starts on the replica's node, and proxies learn a new route a little after it runs."""
    import requests

    while True:
        bases = [f"{root}{prefix}" for root in proxy_urls()]
        for base in bases:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    return base
            except requests.RequestException:
                pass
        if time.monotonic() > deadline:
            raise Sd2Error(
                f"serve smoke check: no Serve proxy answered for the served pair "
                f"({', '.join(bases) or 'no proxies'}) after {timeout_s:.0f} s; {_HINT}"
            )
        time.sleep(1.0)


def ask(config: ServeConfig, base: str, row: dict, timeout_s: float) -> dict[str, Any]:
    """One greedy chat request and the acceptance counters."""
    import requests

    from sd2_ray.rows import instruction_messages

    key = config.effective_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {
        "model": config.served_model_name,
        "messages": instruction_messages(row),
        "max_tokens": 16,
        "temperature": 0,
    }
    try:
        reply = requests.post(f"{base}/chat/completions", json=body, headers=headers, timeout=timeout_s)
        reply.raise_for_status()
        stats = requests.get(f"{base}/spec_stats", headers=headers, timeout=30).json()
    except requests.RequestException as err:
        raise Sd2Error(
            f"serve smoke check: {base}/chat/completions failed ({err}); the stages' "
            f"outputs are complete, rerun to retry only this check or set serve_smoke: "
            f"false"
        ) from None
    data = reply.json()
    return {
        "ok": data["choices"][0]["message"]["content"] is not None,
        "url": base,
        "completion": data["choices"][0]["message"],
        "usage": data.get("usage"),
        "spec_stats": stats,
    }
