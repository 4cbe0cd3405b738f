"""Serve keeps answering when a node holding a replica dies (SIGKILL of its raylet, as a spot
reclaim would), under load from real HTTP clients on loopback: requests in flight on the lost
node fail fast (5xx) or are retried, none hang, and the replica count recovers to 2 once a
replacement node joins. ``ray.cluster_utils.Cluster``: a head that takes no work and two
1-CPU workers, so each of the 2 replicas sits on its own node."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import pytest
from conftest import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # 90-135 s on 2 shared cores

APP = "sd2"
TIMEOUT_S = 30.0  # client timeout: a request still waiting then counts as hung


@pytest.fixture
def cluster(monkeypatch):
    """Head (no CPUs, runs Serve's controller and the proxy clients call) + 2 one-CPU workers.
    Worker proxies listen on another port, so clients reach the app through the head's proxy
    (like a load balancer in front of the head) and a lost worker takes no client socket with it.
    RAY_TMPDIR keeps this cluster's address file away from other Ray clusters on the machine."""
    import ray
    from ray.cluster_utils import Cluster

    agent, dashboard, worker_proxy = free_ports(3)  # fixed defaults would clash with other clusters
    temp_dir = tempfile.mkdtemp(prefix="sd2n-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.setenv("RAY_SERVE_WORKER_PROXY_HTTP_PORT", str(worker_proxy))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The GCS declares a silent raylet dead after 3 missed 1 s health checks (Ray's default: 5 x 3 s).
    head = {
        "num_cpus": 0,
        "include_dashboard": False,
        "dashboard_agent_listen_port": agent,
        "dashboard_port": dashboard,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    }
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        c.connect()
        yield c
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def served(cluster, tmp_path):
    from ray import serve

    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    target, drafter = save_tiny_pair(str(tmp_path))
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(
        target=target,
        drafter=drafter,
        port=port,
        model_name="target",
        replicas=2,
        num_cpus_per_replica=1,
        max_batch_size=4,
        batch_wait_timeout_s=0.01,
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def _kill_raylet(node) -> None:
    from ray._private import ray_constants

    os.kill(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, signal.SIGKILL)


def test_serve_answers_through_the_loss_of_a_replica_node(cluster, served):
    from sd2_ray.testing.serve_load import Load, Timeline, failed, running_replicas

    timeline = Timeline(lambda: running_replicas(APP)).start()
    assert timeline.wait_for(lambda n: n == 2, 60) is not None
    load = Load(
        served, 4, ["hello world", "def add(a, b):", "The quick brown fox"], max_tokens=32, timeout_s=TIMEOUT_S
    ).start()
    time.sleep(3)
    lost = next(iter(cluster.worker_nodes))
    killed_at = time.monotonic()
    _kill_raylet(lost)
    cluster.add_node(num_cpus=1)  # the replacement (autoscaler, spot)
    dropped = timeline.wait_for(lambda n: n < 2, 60)
    recovered = timeline.wait_for(lambda n: n == 2, 120) if dropped is not None else None
    recovered_after = recovered + timeline.t0 - killed_at if recovered is not None else None
    time.sleep(3)  # load on the recovered pair
    stopped = load.stop()
    timeline.stop()
    cluster.remove_node(lost, allow_graceful=False)  # what the SIGKILL left (agents)

    outcomes = load.snapshot()
    during = [o for o in outcomes if o.start <= killed_at + (recovered_after or 0) and o.end >= killed_at]
    bad = failed(outcomes)
    print(
        f"node loss: replicas back to 2 {recovered_after and round(recovered_after, 1)} s after the kill; "
        f"{len(outcomes)} requests, {len(bad)} failed ({sorted({o.status for o in bad})}), "
        f"{sum(o.ok for o in during)} answered between the kill and recovery, slowest "
        f"{max(o.end - o.start for o in outcomes):.1f} s; first failure: {bad[0].error[:120] if bad else '-'}"
    )
    assert stopped, "a client was still waiting past its timeout"
    assert dropped is not None and recovered is not None, f"replicas never back to 2: {timeline.samples[-10:]}"
    assert all(500 <= o.status < 600 for o in bad), [(o.status, o.error) for o in bad][:5]
    assert all(o.end - o.start < TIMEOUT_S for o in outcomes), "a request hung until the client timeout"
    assert sum(o.ok for o in during) > 0, "the endpoint stopped answering while the replica moved"
    assert sum(o.ok for o in outcomes if o.start > killed_at + recovered_after) > 0
