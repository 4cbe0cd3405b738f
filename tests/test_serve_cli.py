"""``sd2 serve`` as a real subprocess: ready line, API key (401 in OpenAI's shape), SIGTERM exit."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from sd2_ray.serve.http import free_port  # noqa: E402

pytestmark = pytest.mark.ray


def _lines(proc) -> queue.Queue:
    """Every stdout line of ``proc`` on a queue (so waiting can time out)."""
    out: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            out.put(line)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_ready(lines: queue.Queue, timeout: float) -> str:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if line.startswith("sd2 serve: ready at"):
            return line
    raise AssertionError("sd2 serve never became ready:\n" + "".join(seen[-40:]))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    return save_tiny_pair(str(tmp_path_factory.mktemp("pair")))


def test_sd2_serve_subprocess_with_api_key(pair):
    import openai

    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "sd2_ray.cli",
        "serve",
        "--target",
        pair[0],
        "--drafter",
        pair[1],
        "--port",
        str(port),
        "--num-speculative-tokens",
        "2",
        "--api-key",
        "s3cret",
        "--model-name",
        "tiny",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        ready = _wait_ready(_lines(proc), timeout=300)
        base = f"http://127.0.0.1:{port}/v1"
        assert base in ready
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            resp = httpx.post(f"{base}/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in good.models.list().data] == ["tiny"]
        done = good.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
        assert done.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0


def test_sd2_serve_missing_model_is_one_line_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sd2_ray.cli", "serve", "--target", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nope" in res.stderr


def test_sd2_serve_vllm_on_gpus_without_any_is_one_line_error(pair):
    """The vLLM replicas' GPU bundles can never be placed on a local Ray without GPUs: exit 2
    naming the field, instead of Serve waiting for GPUs forever."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd2_ray.cli",
            "serve",
            "--target",
            pair[0],
            "--engine",
            "vllm",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("sd2 serve: field 'accelerator': gpu, but the local Ray"), (
        res.stderr[-2000:]
    )
