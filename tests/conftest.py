"""Shared fixtures: random tiny models (milliseconds), a real S3 server on loopback, the model kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


from sd2_ray.serve.http import free_port  # noqa: E402  (one home; tests import it from here)
from sd2_ray.testing.fake_cluster import free_ports  # noqa: E402,F401  (one home, as free_port)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback server; the environment points every client at it."""
    import uuid

    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    name = f"sd2-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield name


def pytest_terminal_summary(terminalreporter):
    """The plain closing line CI reads: "N passed, N failed, N skipped" (errors count as failed)."""
    stats = terminalreporter.stats
    count = lambda *keys: sum(len(stats.get(k, [])) for k in keys)  # noqa: E731
    terminalreporter.write_line(
        f"{count('passed')} passed, {count('failed', 'error')} failed, {count('skipped')} skipped"
    )


@pytest.fixture(scope="module", autouse=True)
def ray_down_after_module():
    """A module that left Ray initialised must not hand its cluster (and that cluster's
    environment and CPU count) to the next module of the same pytest process."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def torch_grad_mode_restored():
    """Process-wide torch state a test changes must not reach the next test (the suite runs in
    one process): grad mode is put back after every test."""
    import torch

    before = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: math tests are faster and steadier on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    from sd2_ray.testing.tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama):
    out = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def kit_dir():
    """The embedded model kit (trained target, drafters, prompts): built once per machine and
    content hash (a few minutes), then returned from the cache at once. See sd2_ray.kit."""
    from sd2_ray.kit import ensure_kit

    return ensure_kit()


@pytest.fixture
def cluster_env() -> dict:
    """Environment the `job_server` cluster (its raylet, hence every job and worker) starts with;
    a test module overrides this fixture to hand its jobs settings."""
    return {}


@pytest.fixture
def cluster_cpus() -> int:
    """Logical CPUs of the `job_server` cluster (a test module overrides this fixture)."""
    return 1


@pytest.fixture
def job_server(cluster_env, cluster_cpus):
    """A private single-node Ray cluster with a job server, on free ports only (other Ray
    clusters on this machine hold the fixed default ports), stopped by its own process group."""
    import signal
    import tempfile
    import time

    import requests

    temp_dir = tempfile.mkdtemp(prefix="sd2r-", dir="/tmp")  # Unix socket paths must stay short

    gcs, dashboard, agent, agent_grpc, client, metrics, env_agent = free_ports(7)
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--num-cpus={cluster_cpus}",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
    ]
    # A loaded 2-core machine starts the dashboard agent slowly; give it time to register.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_agent_register_timeout_ms": "180000", **cluster_env}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed: " + Path(temp_dir, "ray-start.log").read_text()[-1500:])
            time.sleep(1)
        yield address
        os.environ.pop("RAY_ADDRESS", None)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
