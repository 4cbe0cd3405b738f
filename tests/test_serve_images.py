"""Images through the OpenAI endpoint of a vision-language target.

The pure core (no Ray) checks how image parts become prompt ids and pixel values and every
image 400; one private Ray + Serve runs two applications over real HTTP with the ``openai``
client: a tiny LLaVA target with its MASSV drafter at ``/`` and a text-only target at ``/text``.
The models are untrained, so the one thing their output shows is losslessness: the served
greedy answer to an image question is the target's own (Hugging Face LLaVA ``generate``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random

import pytest

from sd2_ray.serve import core
from sd2_ray.serve import openai_schema as oa
from sd2_ray.serve.images import ImagePolicy

MAX_NEW = 12
QUESTION = "Describe the image."
MAX_IMAGE_BYTES = 20_000  # the scenes' PNGs are ~1 KB; a noise image of 128 × 128 is ~49 KB
MAX_IMAGES = 2


def scene_url(seed: int) -> str:
    from sd2_ray.vision import scenes

    return scenes.data_url(scenes.draw(scenes.random_scene(random.Random(seed))))


def png_url(side: int) -> str:
    import numpy as np

    from sd2_ray.vision import scenes

    noise = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return "data:image/png;base64," + base64.b64encode(scenes.png_bytes(noise)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def image_chat(*urls: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from sd2_ray.testing.vision import tiny_vision_dirs

    dirs = tiny_vision_dirs(str(tmp_path_factory.mktemp("vlm")))
    sharpen(dirs["target"])
    return dirs


def sharpen(path: str, scale: float = 30.0) -> None:
    """Make the untrained target's answer depend on its image. At initialisation a layer adds
    little to the residual stream, so with tied embeddings every step predicts the token it
    reads (the same answer for any image); scaled up, the layers' mixing and the projected
    image features decide the tokens. (The vision tower is untouched: the MASSV drafter still
    shares it.)"""
    import torch

    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.vision.model import load_vlm, save_vlm

    vlm = load_vlm(path)
    with torch.no_grad():
        vlm.model.multi_modal_projector.linear_2.weight.mul_(scale)
        for layer in vlm.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    save_vlm(vlm, load_tokenizer(path), path)


@pytest.fixture(scope="module")
def tokenizer(dirs):
    from sd2_ray.models.io import load_tokenizer

    return load_tokenizer(dirs["target"])


@pytest.fixture(scope="module")
def policy(dirs, tokenizer):
    from transformers import AutoConfig

    from sd2_ray.vision.images import image_processor
    from sd2_ray.vision.model import image_token_id

    config = AutoConfig.from_pretrained(dirs["target"])
    return ImagePolicy(
        image_processor(config),
        image_token_id(tokenizer),
        int(config.image_seq_length),
        "<image>",
        max_bytes=MAX_IMAGE_BYTES,
        max_images=MAX_IMAGES,
    )


def chat_request(messages: list[dict], **fields) -> oa.ChatCompletionRequest:
    import json

    return oa.validate_request(oa.ChatCompletionRequest, json.dumps({"messages": messages, **fields}).encode())


# ---- the pure core -------------------------------------------------------------------------------


def test_image_parts_become_the_rows_prompt_ids_and_pixels(tokenizer, policy):
    from sd2_ray.vision.data import prompt_ids

    prepared = core.prepare_chat(chat_request(image_chat(scene_url(1))), tokenizer, 512, 16, policy)
    # the ids distillation and training give the kit's image rows ("<image>\nQuestion")
    row = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    assert prepared.prompt_ids == prompt_ids(tokenizer, row, 1, policy.image_token, policy.patches)
    assert prepared.prompt_ids.count(policy.image_token) == policy.patches
    assert len(prepared.images) == 1 and tuple(prepared.images[0].shape) == (3, 32, 32)
    assert prepared.generation_request().images == prepared.images
    two = chat_request(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Compare"}, *map(image_part, [scene_url(1), scene_url(2)])],
            }
        ]
    )
    assert two.plain_messages()[0]["content"] == "Compare<image>\n<image>"
    text_only = core.prepare_chat(chat_request([{"role": "user", "content": QUESTION}]), tokenizer, 512, 16, policy)
    assert text_only.images == () and policy.image_token not in text_only.prompt_ids


BAD = [  # (content parts, code, words the message must hold)
    (
        [image_part("data:image/png;base64," + base64.b64encode(b"not a png " * 20).decode())],
        "invalid_image",
        "not a readable image",
    ),
    ([image_part("data:text/plain;base64,aGVsbG8=")], "invalid_image", "data:image/"),
    ([image_part(png_url(128))], "image_too_large", "over the limit of 20000"),
    ([image_part(scene_url(i)) for i in range(MAX_IMAGES + 1)], "too_many_images", "at most 2"),
    ([image_part("https://example.com/cat.png")], "remote_image_not_allowed", "remote image URLs are not allowed"),
    ([image_part("/etc/hostname")], "invalid_image_url", "must be a data:image"),
    ([image_part("s3://bucket/cat.png")], "invalid_image_url", "must be a data:image"),
    ([{"type": "text", "text": "<image>\nWhat?"}], "invalid_value", "must not contain '<image>'"),
]
MALFORMED = [
    {"type": "image_url"},
    {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
    {"type": "image_url", "image_url": {"url": ""}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "text", "text": 3},
]


@pytest.mark.parametrize("parts, code, words", BAD)
def test_bad_images_are_400s_naming_the_problem(tokenizer, policy, parts, code, words):
    request = chat_request([{"role": "user", "content": parts}])
    with pytest.raises(oa.OpenAIError) as info:
        core.prepare_chat(request, tokenizer, 512, 16, policy)
    assert (info.value.status, info.value.code) == (400, code) and words in info.value.message
    assert info.value.param.startswith("messages")


@pytest.mark.parametrize("part", MALFORMED)
def test_malformed_content_parts_are_400s(part):
    with pytest.raises(oa.OpenAIError) as info:
        chat_request([{"role": "user", "content": [part]}])
    assert info.value.status == 400 and info.value.param == "messages.0.content"
    assert "content part 0" in info.value.message


def test_text_targets_refuse_images_and_vision_targets_image_tokens_in_completions(tokenizer, policy):
    with pytest.raises(oa.OpenAIError) as info:
        core.prepare_chat(chat_request(image_chat(scene_url(1))), tokenizer, 512, 16, None)
    assert info.value.code == "images_not_supported" and "text-only" in info.value.message
    assert info.value.param == "messages.0.content.0.image_url.url"
    completion = oa.validate_request(oa.CompletionRequest, b'{"prompt": "<image> what is it?"}')
    with pytest.raises(oa.OpenAIError, match="0 image"):
        core.prepare_completion(completion, tokenizer, 512, len(tokenizer), policy)


def test_image_config_defaults():
    from sd2_ray.serve.config import ServeConfig

    cfg = ServeConfig(target="t")
    assert (cfg.allow_remote_images, cfg.max_image_bytes, cfg.max_images_per_request) == (False, 4 << 20, 4)


# ---- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(dirs):
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.serve.http import free_port

    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # a private cluster, whatever `ray start` runs here
    ray = ensure_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        vision = ServeConfig(
            target=dirs["target"],
            drafter=dirs["drafter"],
            port=port,
            num_speculative_tokens=3,
            max_batch_size=8,
            batch_wait_timeout_s=0.3,  # the concurrent test's requests meet in one batch
            max_image_bytes=MAX_IMAGE_BYTES,
            max_images_per_request=MAX_IMAGES,
            max_model_len=256,
        )
        serve.run(build_app(vision), name="vision", route_prefix="/")
        text = ServeConfig(target=dirs["text_drafter"], port=port, app_name="text", max_model_len=256)
        serve.run(build_app(text), name="text", route_prefix="/text")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def target_only(dirs, tokenizer, url: str) -> list[int]:
    """Greedy ids of the LLaVA target alone (Hugging Face's generate, no engine, no drafter)."""
    import torch

    from sd2_ray.models.tokens import eos_token_ids
    from sd2_ray.vision.data import prompt_ids
    from sd2_ray.vision.images import image_processor, load_image, pixel_values
    from sd2_ray.vision.model import load_vlm

    vlm = load_vlm(dirs["target"])
    row = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    ids = torch.tensor([prompt_ids(tokenizer, row, 1, vlm.config.image_token_id, vlm.config.image_seq_length)])
    pixels = pixel_values([load_image(url)], image_processor(vlm.config))
    with torch.inference_mode():
        out = vlm.generate(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=eos_token_ids(vlm.generation_config, vlm.config.text_config, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.ray
def test_image_chat_is_lossless_streamed_and_batched(server, client, dirs, tokenizer):
    import httpx
    import openai

    url = scene_url(7)
    expected = target_only(dirs, tokenizer, url)
    assert expected != target_only(dirs, tokenizer, scene_url(8))  # the answer depends on the image
    done = client.chat.completions.create(model="target", messages=image_chat(url), max_tokens=MAX_NEW, temperature=0)
    assert done.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert done.usage.completion_tokens == len(expected)
    assert done.usage.model_extra["spec_decode"]["num_speculative_tokens"] == 3  # the MASSV drafter drafted
    chunks = list(
        client.chat.completions.create(
            model="target", messages=image_chat(url), max_tokens=MAX_NEW, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content

    # image and text requests at once: one batch, each answer the one it gets alone
    asks = [image_chat(url), [{"role": "user", "content": QUESTION}], image_chat(scene_url(8))]
    alone = [
        client.chat.completions.create(model="target", messages=m, max_tokens=MAX_NEW, temperature=0) for m in asks[1:]
    ]
    before = httpx.get(f"{server}/v1/spec_stats").json()

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(
                *(
                    c.chat.completions.create(model="target", messages=m, max_tokens=MAX_NEW, temperature=0)
                    for m in asks
                )
            )

    answers = [r.choices[0].message.content for r in asyncio.run(together())]
    assert answers == [done.choices[0].message.content] + [r.choices[0].message.content for r in alone]
    after = httpx.get(f"{server}/v1/spec_stats").json()
    assert after["batches"] - before["batches"] < 3 and after["max_batch_size_seen"] >= 2


HTTP_BAD = [  # (route prefix, content parts, code)
    ("", BAD[0][0], "invalid_image"),
    ("", BAD[2][0], "image_too_large"),
    ("", BAD[3][0], "too_many_images"),
    ("", BAD[4][0], "remote_image_not_allowed"),
    ("", [MALFORMED[1]], "invalid_value"),
    ("/text", [image_part(scene_url(1))], "images_not_supported"),
]


@pytest.mark.ray
@pytest.mark.parametrize("prefix, parts, code", HTTP_BAD)
def test_bad_image_requests_get_openai_400s(server, prefix, parts, code):
    import openai

    with openai.OpenAI(base_url=f"{server}{prefix}/v1", api_key="x", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=_model(prefix), messages=[{"role": "user", "content": parts}], max_tokens=2)
        error = info.value.body
        assert info.value.status_code == 400 and error["code"] == code and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        streamed = image_chat(scene_url(3)) if not prefix else [{"role": "user", "content": "hi"}]
        assert list(c.chat.completions.create(model=_model(prefix), messages=streamed, max_tokens=2, stream=True))


def _model(prefix: str) -> str:
    return "text_drafter" if prefix else "target"
