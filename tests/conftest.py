"""Shared fixtures: random tiny models (milliseconds), a real S3 server on loopback, the model kit."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = f"sd2-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield name


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
    from sd2_ray.models.tiny import tiny_model

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
