"""The served pair over real HTTP on loopback, with the official ``openai`` client.

One local Ray + Serve per module, two applications: the main one at ``/`` and a tight one
(batch 1, no queue) at ``/tight`` for the 503 test. Models: the model kit when it exists,
else a tiny random pair (same code paths, meaningless acceptance).
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

pytestmark = pytest.mark.ray

MAX_NEW = 16


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory):
    """(target dir, drafter dir, list of chat prompts)."""
    try:
        import sd2_ray.kit  # noqa: F401

        if os.environ.get("SD2_SERVE_TESTS_TINY"):  # quick iterations without the kit
            raise ImportError
    except ImportError:
        from sd2_ray.testing.serve_pairs import save_tiny_pair

        target, drafter = save_tiny_pair(str(tmp_path_factory.mktemp("pair")))
        return target, drafter, ["hello world", "def add(a, b):", "The quick brown fox"]
    kit = request.getfixturevalue("kit_dir")
    with open(os.path.join(kit, "prompts", "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [row["messages"][0]["content"] for row in rows[:8]]
    return os.path.join(kit, "target"), os.path.join(kit, "drafter"), prompts


@pytest.fixture(scope="module")
def server(pair):
    from ray import serve

    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.config import ServeConfig

    target, drafter, _ = pair
    from sd2_ray.runtime import ensure_ray

    ray = ensure_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        main = ServeConfig(
            target=target,
            drafter=drafter,
            port=port,
            num_speculative_tokens=3,
            max_batch_size=16,
            batch_wait_timeout_s=0.05,
            max_queued_requests=64,
        )
        serve.run(build_app(main), name="sd2", route_prefix="/")
        tight = main.model_copy(update={"max_batch_size": 1, "max_queued_requests": 0, "app_name": "tight"})
        serve.run(build_app(tight), name="tight", route_prefix="/tight")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


from sd2_ray.serve.http import free_port  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, prompt, **kw):
    return client.chat.completions.create(
        model="target",
        messages=[{"role": "user", "content": prompt}],
        **{"max_tokens": MAX_NEW, "temperature": 0, **kw},
    )


def test_models_completion_chat_and_stream(server, client, pair):
    assert [m.id for m in client.models.list().data] == ["target"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    done = client.completions.create(model="target", prompt=pair[2][0], max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert 1 <= done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    before = httpx.get(f"{server}/v1/spec_stats").json()["categories"].get("qa", {}).get("requests", 0)
    chat = _chat(client, pair[2][0], metadata={"category": "qa"})  # labels this request's acceptance metrics
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    assert httpx.get(f"{server}/v1/spec_stats").json()["categories"]["qa"]["requests"] == before + 1
    spec = chat.usage.model_extra["spec_decode"]
    assert spec["num_speculative_tokens"] == 3 and 1.0 <= spec["mean_accepted_length"] <= 4.0
    chunks = list(_chat(client, pair[2][0], stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    with httpx.stream(
        "POST", f"{server}/v1/completions", json={"prompt": pair[2][1], "max_tokens": 4, "stream": True}
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_greedy_output_equals_target_only(client, pair):
    import torch

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.serve.core import render_messages
    from sd2_ray.specdec.engine import eos_ids_of

    model, tok = load_model(pair[0]), load_tokenizer(pair[0])
    for prompt in pair[2][:3]:
        text = render_messages([{"role": "user", "content": prompt}], tok)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():  # the plain target, no drafter, no engine: Hugging Face greedy
            out = model.generate(
                ids,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=list(eos_ids_of(model, tok)),
                pad_token_id=tok.pad_token_id,
                attention_mask=torch.ones_like(ids),
            )
        new = out[0, ids.shape[1] :].tolist()
        served = _chat(client, prompt)
        assert served.choices[0].message.content == tok.decode(new, skip_special_tokens=True)
        assert served.usage.completion_tokens == len(new)


def test_concurrent_clients_share_forward_passes(server, pair):
    import openai

    before = httpx.get(f"{server}/v1/spec_stats").json()

    async def one_client(i):
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=300) as c:
            results = []
            for j in range(3):
                prompt = pair[2][(i + j) % len(pair[2])]
                r = await c.chat.completions.create(
                    model="target", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_NEW, temperature=0
                )
                results.append(r)
            return results

    async def all_clients():
        return await asyncio.gather(*(one_client(i) for i in range(32)))

    results = [r for rs in asyncio.run(all_clients()) for r in rs]
    assert len(results) == 96 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    after = httpx.get(f"{server}/v1/spec_stats").json()
    delta = {
        k: after[k] - before[k]
        for k in ("requests", "completion_tokens", "target_passes", "target_forward_calls", "batches")
    }
    assert delta["requests"] == 96
    assert delta["completion_tokens"] == sum(r.usage.completion_tokens for r in results)
    # Batching merged requests: fewer target forward calls than the requests' own passes
    # (each of which a lone request would have paid for), and far fewer than tokens.
    assert delta["target_forward_calls"] < delta["target_passes"] / 2
    assert delta["target_forward_calls"] < delta["completion_tokens"]
    assert after["max_batch_size_seen"] > 4 and delta["batches"] < 96


MALFORMED = [
    ("POST", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/completions", b'"just a string"', 400, "invalid_request"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 3}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 400, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "hello " * 5000}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "context_length_exceeded"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}], "stream": 1}, 400, "invalid_value"),
    ("GET", "/v1/nothing-here", None, 404, None),
    ("GET", "/v1/completions", None, 405, None),
]


@pytest.mark.parametrize("method, path, body, status, code", MALFORMED)
def test_malformed_requests_get_openai_4xx(server, client, method, path, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    resp = httpx.request(method, f"{server}{path}", timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    assert client.completions.create(prompt="hi", model="target", max_tokens=2).usage.completion_tokens >= 1


def test_stop_strings_and_seeded_sampling(client, pair):
    full = _chat(client, pair[2][1]).choices[0].message.content
    if len(full) >= 4:
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        cut = _chat(client, pair[2][1], stop=[stop])
        assert cut.choices[0].message.content == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    a = _chat(client, pair[2][2], temperature=1.0, seed=7).choices[0].message.content
    b = _chat(client, pair[2][2], temperature=1.0, seed=7).choices[0].message.content
    assert a == b


def test_full_queue_answers_503_and_keeps_serving(server):
    async def burst():
        async with httpx.AsyncClient(timeout=300) as c:
            body = {"prompt": "hello", "max_tokens": 48, "temperature": 0}
            return await asyncio.gather(*(c.post(f"{server}/tight/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["error"]["code"] == "queue_full"
    after = httpx.post(f"{server}/tight/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200
