"""The pipeline's closing serve smoke check on a multi-node Ray (head + worker raylets on this
machine, loopback only): the head takes no work, so the job's driver and every replica run on
the worker, and Serve already serves a production app named ``sd2``. The check must pass through
a Serve proxy and leave the production app deployed and answering."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from conftest import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # ~100 s on 2 shared cores

JOBS = str(Path(__file__).with_name("_serve_jobs.py"))
RAY = str(Path(sys.executable).with_name("ray"))


def _ray_start(args: list[str], temp_dir: str, log_name: str) -> subprocess.Popen:
    """One `ray start --block` node in its own process group (stopped by that group only)."""
    agent, agent_grpc, metrics, env_agent = free_ports(4)
    cmd = [
        RAY,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--temp-dir={temp_dir}",
        *args,
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_agent_register_timeout_ms": "180000",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, log_name), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_nodes(dashboard: str, count: int, procs, temp_dir: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = requests.get(f"{dashboard}/nodes?view=summary", timeout=5).json()["data"]["summary"]
            if sum(1 for n in nodes if n["raylet"]["state"] == "ALIVE") >= count:
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            logs = "".join(Path(temp_dir, f).read_text()[-800:] for f in ("head.log", "worker.log"))
            pytest.fail(f"test cluster did not come up: {logs}")
        time.sleep(1)


@pytest.fixture(scope="module")
def head_and_worker():
    """(dashboard URL, temp dir): a head with no CPUs and a 2-CPU worker, on free ports."""
    temp_dir = tempfile.mkdtemp(prefix="sd2c-", dir="/tmp")  # Unix socket paths must stay short
    gcs, dashboard, client = free_ports(3)
    head = _ray_start(
        [
            "--head",
            "--num-cpus=0",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client}",
            "--include-dashboard=true",
        ],
        temp_dir,
        "head.log",
    )
    procs = [head]
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_nodes(url, 1, procs, temp_dir)
        procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2"], temp_dir, "worker.log"))
        _wait_nodes(url, 2, procs, temp_dir)
        yield url, temp_dir
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_job(dashboard: str, args: list[str], timeout: float = 300, **options) -> tuple[str, str]:
    """Submit ``tests/_serve_jobs.py ARGS``, wait for it to end; (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    job = client.submit_job(entrypoint=" ".join([sys.executable, JOBS, *args]), **options)
    deadline = time.monotonic() + timeout
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            return "TIMEOUT", client.get_job_logs(job)
        time.sleep(2)
    return str(client.get_job_status(job).value), client.get_job_logs(job)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    root = tmp_path_factory.mktemp("pair")
    target, drafter = save_tiny_pair(str(root))
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "hello world"}) + "\n")
    return target, drafter, str(prompts)


def _apps(dashboard: str) -> dict:
    return requests.get(f"{dashboard}/api/serve/applications/", timeout=30).json()["applications"]


def test_smoke_check_from_a_worker_leaves_production_serving(head_and_worker, pair):
    dashboard, _ = head_and_worker
    target, drafter, prompts = pair
    (port,) = free_ports(1)
    models = ["--target", target, "--drafter", drafter]
    status, logs = _run_job(dashboard, ["deploy", *models, "--port", str(port)])
    assert status == "SUCCEEDED", logs[-2000:]
    prod = f"http://127.0.0.1:{port}"
    assert requests.get(f"{prod}/v1/models", timeout=30).json()["data"][0]["id"] == "target"

    # The driver takes the worker's CPU (the head has none): it runs on a worker node.
    began = time.monotonic()
    status, logs = _run_job(
        dashboard,
        ["smoke", *models, "--prompts", prompts, "--model-name", "smoke", "--timeout", "60"],
        entrypoint_num_cpus=1,
    )
    took = time.monotonic() - began
    assert status == "SUCCEEDED", logs[-2000:]
    lines = [line for line in logs.splitlines() if line.startswith("sd2-smoke-result: ")]
    assert lines, logs[-2000:]
    result = json.loads(lines[-1].partition(": ")[2])
    assert result["ok"] and result["usage"]["completion_tokens"] > 0
    # its own app and route, reached through the running Serve's proxies (production's port)
    assert result["app"].startswith("sd2-smoke-")
    assert result["url"] == f"http://127.0.0.1:{port}/{result['app']}/v1", result["url"]
    print(f"smoke check from a worker: {took:.1f} s (job), {result['seconds']} s (check), via {result['url']}")

    apps = _apps(dashboard)
    assert set(apps) == {"sd2"}, f"apps after the smoke check: {sorted(apps)}"
    assert apps["sd2"]["route_prefix"] == "/" and apps["sd2"]["status"] == "RUNNING"
    reply = requests.post(
        f"{prod}/v1/chat/completions",
        timeout=60,
        json={"model": "target", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
    )
    assert reply.status_code == 200 and reply.json()["model"] == "target"
