"""A smoke check of a served pair (the pipeline's last step): serve it on a free loopback port,
send one greedy chat request through the OpenAI route, read the acceptance counters, take the
app down. Failures are one-line errors that say what to change."""
from __future__ import annotations

import time
from typing import Any

from sd2_ray.errors import Sd2Error
from sd2_ray.serve.config import ServeConfig
from sd2_ray.serve.http import free_port

BASE_TIMEOUT_S = 180.0
SECONDS_PER_GB = 10.0  # loading weights from S3 and into the engine; 140 GB of 70B weights ~ 25 min


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


def serve_smoke(config: ServeConfig, prompts: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Serve the pair on a free loopback port, send one greedy chat request, take the app down."""
    import requests
    from ray import serve

    from sd2_ray.rows import instruction_messages, read_rows
    from sd2_ray.serve.job import start

    config = config.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    timeout_s = smoke_timeout(config, timeout_s)
    key = config.effective_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    row = read_rows(prompts, limit=1)[0]
    began = time.perf_counter()
    base = start(config)
    try:
        wait_healthy(base.removesuffix("/v1") + "/health", timeout_s)
        body = {"model": config.served_model_name, "messages": instruction_messages(row), "max_tokens": 16,
                "temperature": 0}
        try:
            reply = requests.post(f"{base}/chat/completions", json=body, headers=headers, timeout=timeout_s)
            reply.raise_for_status()
            stats = requests.get(f"{base}/spec_stats", headers=headers, timeout=30).json()
        except requests.RequestException as err:
            raise Sd2Error(f"serve smoke check: {base}/chat/completions failed ({err}); the stages' "
                           f"outputs are complete, rerun to retry only this check or set serve_smoke: "
                           f"false") from None
    finally:
        serve.delete(config.app_name)
    data = reply.json()
    return {"ok": bool(data["choices"][0]["message"]["content"] is not None), "url": base,
            "seconds": round(time.perf_counter() - began, 2), "completion": data["choices"][0]["message"],
            "usage": data.get("usage"), "spec_stats": stats}


def wait_healthy(url: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise Sd2Error(f"serve smoke check: the served pair was not healthy at {url} after "
                           f"{timeout_s:.0f} s; raise serve_smoke_timeout_s (large models load slowly) "
                           f"or set serve_smoke: false")
        time.sleep(1.0)
