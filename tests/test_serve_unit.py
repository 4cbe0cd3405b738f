"""Serving layer without Ray: config, request validation, text/stop handling, batch runner."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from sd2_ray.errors import ConfigError
from sd2_ray.serve import core
from sd2_ray.serve import openai_schema as oa
from sd2_ray.serve.config import ServeConfig


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    return save_tiny_pair(str(tmp_path_factory.mktemp("pair")))


@pytest.fixture(scope="module")
def tokenizer(pair):
    from sd2_ray.models.io import load_tokenizer

    return load_tokenizer(pair[0])


def test_config_replicas_and_autoscaling():
    cfg = ServeConfig.load(None, {"target": "/m/target", "replicas": "3"})
    assert cfg.replicas == 3 and cfg.autoscaling_settings() is None
    assert cfg.served_model_name == "target" and cfg.base_url == "http://127.0.0.1:8000/v1"
    auto = ServeConfig.load(None, {"target": "t", "replicas": "auto"})
    assert auto.autoscaling_settings() == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4.0}
    custom = ServeConfig.load(
        None, {"target": "t", "autoscaling.max_replicas": 5, "autoscaling.target_ongoing_requests": 2}
    )
    assert custom.autoscaling_settings()["max_replicas"] == 5
    with pytest.raises(ConfigError, match="autoscaling"):
        ServeConfig.load(None, {"target": "t", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="replicas"):
        ServeConfig.load(None, {"target": "t", "replicas": 0})
    with pytest.raises(ConfigError, match="port"):
        ServeConfig.load(None, {"target": "t", "port": 70000})
    with pytest.raises(ConfigError, match="unknown field"):
        ServeConfig.load(None, {"target": "t", "max_batch": 3})


def test_cli_flags_come_from_config_fields():
    from sd2_ray import cli

    args = cli.build_parser().parse_args(
        [
            "serve",
            "--target",
            "T",
            "--drafter",
            "D",
            "--port",
            "8123",
            "--num-speculative-tokens",
            "3",
            "--replicas",
            "auto",
            "--api-key",
            "k",
            "--engine",
            "vllm",
        ]
    )
    cfg = cli.load_config("serve", args)
    assert (cfg.target, cfg.drafter, cfg.port, cfg.num_speculative_tokens, cfg.replicas, cfg.api_key, cfg.engine) == (
        os.path.abspath("T"),
        os.path.abspath("D"),
        8123,
        3,
        "auto",
        "k",
        "vllm",
    )


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": -3}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"prompt": "x", "temperature": 3}', "temperature"),
        (b'{"prompt": "x", "n": 2}', "n"),
        (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": 5}', "prompt"),
        (b'{"max_tokens": 5}', "prompt"),
        (b'{"prompt": ["a", "b"]}', "prompt"),
        (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"prompt": "x", "logprobs": 3}', "logprobs"),
        (b'{"prompt": "x", "metadata": {"category": 3}}', "metadata.category"),
    ],
)
def test_completion_request_errors_are_400_naming_the_field(body, param):
    with pytest.raises(oa.OpenAIError) as info:
        oa.validate_request(oa.CompletionRequest, body)
    err = info.value
    assert err.status == 400 and err.message
    assert err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_request_validation():
    ok = oa.validate_request(
        oa.ChatCompletionRequest,
        b'{"messages": [{"role": "user", "content": '
        b'[{"type": "text", "text": "a"}, {"type": "text", '
        b'"text": "b"}]}], "max_completion_tokens": 4, '
        b'"stop": "x", "user": "ignored"}',
    )
    assert ok.plain_messages() == [{"role": "user", "content": "ab"}]
    assert ok.requested_max_tokens == 4 and ok.stop_strings == ["x"]
    for body in (
        b'{"messages": []}',
        b'{"messages": "hi"}',
        b'{"messages": [{"content": "x"}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    ):
        with pytest.raises(oa.OpenAIError) as info:
            oa.validate_request(oa.ChatCompletionRequest, body)
        assert info.value.status == 400 and info.value.param.startswith("messages")


def test_context_bounds_and_unknown_model(tokenizer):
    req = oa.validate_request(oa.CompletionRequest, b'{"prompt": "hello world", "max_tokens": 5}')
    prepared = core.prepare_completion(req, tokenizer, max_model_len=64, vocab_size=len(tokenizer))
    assert prepared.max_tokens == 5 and prepared.prompt_ids == tokenizer("hello world")["input_ids"]
    too_long = oa.validate_request(oa.CompletionRequest, b'{"prompt": "' + b"hello " * 80 + b'"}')
    with pytest.raises(oa.OpenAIError, match="longer than the context") as info:
        core.prepare_completion(too_long, tokenizer, max_model_len=64, vocab_size=len(tokenizer))
    assert info.value.code == "context_length_exceeded"
    big = oa.validate_request(oa.CompletionRequest, b'{"prompt": "hi", "max_tokens": 1000}')
    with pytest.raises(oa.OpenAIError, match="max_tokens") as info:
        core.prepare_completion(big, tokenizer, max_model_len=64, vocab_size=len(tokenizer))
    assert info.value.param == "max_tokens"
    ids = oa.validate_request(oa.CompletionRequest, b'{"prompt": [1, 99999]}')
    with pytest.raises(oa.OpenAIError, match="vocabulary"):
        core.prepare_completion(ids, tokenizer, max_model_len=64, vocab_size=len(tokenizer))
    chat = oa.validate_request(oa.ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}]}')
    prepared = core.prepare_chat(chat, tokenizer, max_model_len=64, default_max_tokens=1000)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prepared.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prepared.max_tokens == 64 - len(prepared.prompt_ids)  # default: the rest of the context
    core.check_model_name(None, "target")
    core.check_model_name("target", "target")
    with pytest.raises(oa.OpenAIError) as info:
        core.check_model_name("gpt-4", "target")
    assert info.value.status == 400 and info.value.code == "model_not_found"


def _feed_all(stream, ids, step=1):
    out = ""
    for i in range(0, len(ids), step):
        out += stream.feed(ids[i : i + step])
        if stream.stopped:
            break
    return out + stream.finish()


def test_text_stream_equals_full_decode_and_trims_stop_strings(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. def add(a, b):"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _feed_all(core.TextStream(tokenizer), ids) == text
    stream = core.TextStream(tokenizer, stop=["lazy"])
    assert _feed_all(stream, ids) == "The quick brown fox jumps over the "
    assert stream.stopped
    # a stop string spread over several tokens, fed 3 at a time: never leaks its first part
    stream = core.TextStream(tokenizer, stop=["over the"])
    pieces = [stream.feed(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(pieces) + stream.finish() == "The quick brown fox jumps "
    assert all("over" not in p for p in pieces)
    # multi-byte characters split over byte-level tokens are released whole
    emoji = tokenizer("héllo → ü", add_special_tokens=False)["input_ids"]
    stream = core.TextStream(tokenizer)
    parts = [stream.feed([t]) for t in emoji]
    assert all(core.REPLACEMENT_CHAR not in p for p in parts)
    assert "".join(parts) + stream.finish() == "héllo → ü"


def test_run_batch_streams_each_request_and_honours_stop(pair, tokenizer):
    from sd2_ray.serve.batching import Job, run_batch
    from sd2_ray.specdec.engine import SpeculativeEngine
    from sd2_ray.specdec.types import SamplingParams

    engine = SpeculativeEngine.from_dirs(pair[0], pair[1], num_speculative_tokens=3)
    plain = core.PreparedRequest(tokenizer("hello")["input_ids"], 12, SamplingParams())
    reference = engine.generate([plain.generation_request()])[0]
    ref_text = tokenizer.decode(reference.token_ids, skip_special_tokens=True)
    stop_at = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 2]
    stopped = core.PreparedRequest(plain.prompt_ids, 12, SamplingParams(), stop=[stop_at] if stop_at.strip() else [])
    other = core.PreparedRequest(tokenizer("numbers 1 2")["input_ids"], 7, SamplingParams())
    jobs = [core_job for core_job in (Job(r, core.TextStream(tokenizer, r.stop)) for r in (plain, stopped, other))]

    async def collect():
        texts, finals = ["", "", ""], [None, None, None]
        async for step in run_batch(engine, jobs, ThreadPoolExecutor(1)):
            assert len(step) == 3
            for i, delta in enumerate(step):
                texts[i] += delta.text
                finals[i] = delta if delta.finish_reason else finals[i]
        return texts, finals

    texts, finals = asyncio.run(collect())
    assert texts[0] == ref_text and finals[0].token_ids == reference.token_ids
    assert finals[0].finish_reason == reference.finish_reason
    if stopped.stop:
        assert texts[1] == ref_text[: ref_text.index(stop_at)] and finals[1].finish_reason == "stop"
    assert len(finals[2].token_ids) <= 7 and finals[2].stats.target_passes >= 1


def test_large_batches_decode_without_the_drafter_and_say_so(pair, tokenizer):
    from sd2_ray.serve.batching import Job, run_batch
    from sd2_ray.serve.metrics import SpecMetrics
    from sd2_ray.specdec.engine import SpeculativeEngine
    from sd2_ray.specdec.types import SamplingParams

    engine = SpeculativeEngine.from_dirs(pair[0], pair[1], num_speculative_tokens=3)
    requests = [
        core.PreparedRequest(tokenizer(text)["input_ids"], 10, SamplingParams())
        for text in ("hello", "numbers 1 2", "the cat")
    ]

    async def finals(speculate):
        jobs = [Job(r, core.TextStream(tokenizer, r.stop)) for r in requests]
        last = [None] * len(jobs)
        async for step in run_batch(engine, jobs, ThreadPoolExecutor(1), speculate=speculate):
            last = [d if d.finish_reason else prev for d, prev in zip(step, last, strict=True)]
        return last

    drafted, plain = asyncio.run(finals(True)), asyncio.run(finals(False))
    assert [d.token_ids for d in drafted] == [d.token_ids for d in plain]  # greedy: same text either way
    assert sum(d.stats.num_draft_tokens for d in drafted) > 0
    assert all(d.stats.num_draft_tokens == 0 and d.stats.target_passes == len(d.token_ids) for d in plain)
    metrics = SpecMetrics("t", 3)
    metrics.record_batch(3, speculative=False)
    metrics.record_batch(1)
    assert metrics.summary()["batches_without_speculation"] == 1
    with pytest.raises(ConfigError, match="speculative_disable_by_batch_size"):
        ServeConfig.load(overrides={"target": "t", "engine": "vllm", "speculative_disable_by_batch_size": 8})
    with pytest.raises(ConfigError, match="speculative_disable_by_batch_size"):
        ServeConfig.load(overrides={"target": "t", "speculative_disable_by_batch_size": 1})


def test_metrics_summary_totals():
    from sd2_ray.serve.metrics import SpecMetrics
    from sd2_ray.specdec.types import SpecStats

    m = SpecMetrics("t", 2)
    m.record_batch(3)
    m.record_request(
        SpecStats(
            2,
            target_passes=4,
            num_drafts=4,
            num_draft_tokens=8,
            num_accepted_tokens=4,
            committed_tokens=8,
            accepted_per_position=[3, 1],
        ),
        5,
        8,
    )
    s = m.summary()
    assert s["mean_accepted_length"] == 2.0 and s["per_position_acceptance"] == [0.75, 0.25]
    assert s["acceptance_rate"] == 0.5 and s["max_batch_size_seen"] == 3 and s["completion_tokens"] == 8


class FakeCounter:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append((value, dict(tags)))


def test_acceptance_metrics_are_labelled_by_the_requests_category(tokenizer):
    """A request's metadata.category labels its acceptance counters; only configured categories
    get a label of their own (others are 'other', none is 'uncategorized')."""
    from sd2_ray.serve.metrics import COUNTERS, SpecMetrics
    from sd2_ray.specdec.types import SpecStats

    def prepared(body: bytes):
        return core.prepare_completion(oa.validate_request(oa.CompletionRequest, body), tokenizer, 64, 1000)

    from sd2_ray.kit.tasks import TASKS

    default = ServeConfig.load(overrides={"target": "t"}).metric_categories
    assert "qa" in default and set(TASKS) <= set(default)  # Spec-Bench's and the kit's by default
    math = prepared(b'{"prompt": "x", "metadata": {"category": "math", "user": "u1"}}')
    chat = oa.validate_request(
        oa.ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "x"}], "metadata": {"category": "zz-1"}}'
    )
    categories = [
        math.category,
        core.prepare_chat(chat, tokenizer, 64, 8).category,
        prepared(b'{"prompt": "x"}').category,
    ]
    assert categories == ["math", "zz-1", None]
    counters = {name: FakeCounter() for name in COUNTERS}
    m = SpecMetrics("t", 2, counters=counters, categories=["math", "qa"])
    one = SpecStats(
        2,
        target_passes=2,
        num_drafts=2,
        num_draft_tokens=4,
        num_accepted_tokens=2,
        committed_tokens=4,
        accepted_per_position=[2, 0],
    )
    full = SpecStats(
        2,
        target_passes=1,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        committed_tokens=3,
        accepted_per_position=[1, 1],
    )
    for stats, category in zip((one, full, one), categories, strict=True):
        m.record_request(stats, 3, 4, category)
    labels = [tags["category"] for _, tags in counters["num_accepted_tokens"].calls]
    assert labels == ["math", "other", "uncategorized"]
    assert ("1", "other") in {(t["position"], t["category"]) for _, t in counters["num_accepted_tokens_per_pos"].calls}
    by = m.summary()["categories"]
    assert set(by) == {"math", "other", "uncategorized"} and by["other"]["mean_accepted_length"] == 3.0
    assert by["math"] == {
        "requests": 1,
        "acceptance_rate": 0.5,
        "mean_accepted_length": 2.0,
        "per_position_acceptance": [1.0, 0.0],
    }


def test_app_builder_maps_replicas_autoscaling_and_queue_bounds():
    from sd2_ray.errors import ConfigError as Err
    from sd2_ray.serve.app import app_builder

    auto = app_builder(
        {
            "target": "/m/target",
            "replicas": "auto",
            "max_batch_size": 4,
            "max_queued_requests": 10,
            "autoscaling": {"max_replicas": 3},
        }
    )._bound_deployment
    cfg = auto._deployment_config
    assert (cfg.autoscaling_config.min_replicas, cfg.autoscaling_config.max_replicas) == (1, 3)
    # the replica answers 503 itself past 4 + 10; Serve's limits sit above that as a backstop
    assert cfg.max_ongoing_requests > 14 and cfg.max_queued_requests >= 14
    # the delays and windows reach Serve as given; unset ones keep Serve's defaults
    quick = app_builder(
        {
            "target": "/m/target",
            "autoscaling": {"max_replicas": 3, "upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 2},
        }
    )._bound_deployment._deployment_config.autoscaling_config
    assert (quick.upscale_delay_s, quick.downscale_delay_s, quick.look_back_period_s) == (2, 5, 2)
    assert cfg.autoscaling_config.downscale_delay_s == 600.0
    with pytest.raises(Err, match="downscale_delay_s"):
        app_builder({"target": "/m/target", "autoscaling": {"downscale_delay_s": -1}})
    fixed = app_builder({"target": "/m/target", "replicas": 3})._bound_deployment
    assert fixed._deployment_config.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    with pytest.raises(Err, match="num_speculative_tokens"):
        app_builder({"target": "/m/target", "num_speculative_tokens": 0})


def test_one_failing_request_fails_alone_not_its_batch(pair, tokenizer):
    """An engine failure caused by one request (here an id past the vocabulary, which the HTTP
    edge would refuse) fails that request only; the rest of its batch still gets its answer."""
    from sd2_ray.serve.batching import Job, run_batch
    from sd2_ray.specdec.engine import SpeculativeEngine
    from sd2_ray.specdec.types import SamplingParams

    engine = SpeculativeEngine.from_dirs(pair[0], pair[1], num_speculative_tokens=3)
    good = [core.PreparedRequest(tokenizer(text)["input_ids"], 6, SamplingParams()) for text in ("hello", "the cat")]
    bad = core.PreparedRequest([10**6], 6, SamplingParams())
    expected = [r.token_ids for r in engine.generate([g.generation_request() for g in good])]

    async def finals():
        jobs = [Job(r, core.TextStream(tokenizer, r.stop)) for r in (good[0], bad, good[1])]
        last = [None] * 3
        async for step in run_batch(engine, jobs, ThreadPoolExecutor(1)):
            last = [d if d.finish_reason else prev for d, prev in zip(step, last, strict=True)]
        return last

    first, failed, third = asyncio.run(finals())
    assert failed.finish_reason == "error" and "IndexError" in failed.error
    assert (first.error, third.error) == (None, None)
    assert [first.token_ids, third.token_ids] == expected


@pytest.mark.parametrize("seed, ok", [(2**63 - 1, True), (-(2**63), True), (2**70, False), (-(2**64), False)])
def test_seed_outside_64_bits_is_a_400_naming_it(seed, ok):
    body = json.dumps({"prompt": "hi", "seed": seed}).encode()
    if ok:
        assert oa.validate_request(oa.CompletionRequest, body).seed == seed
    else:
        with pytest.raises(oa.OpenAIError) as err:
            oa.validate_request(oa.CompletionRequest, body)
        assert err.value.status == 400 and err.value.param == "seed"


def test_smoke_check_reaches_serve_through_its_proxies(monkeypatch):
    """The smoke check calls the proxies the Serve controller lists (node IP, Serve's port), not
    the driver's loopback; a proxy bound to loopback is called there only on this machine."""
    import ray

    from sd2_ray.serve import smoke

    details = {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "target_groups": [
            {"protocol": "HTTP", "targets": [{"ip": "10.0.0.1", "port": 8000}, {"ip": "10.0.0.2", "port": 8000}]},
            {"protocol": "gRPC", "targets": [{"ip": "10.0.0.1", "port": 9000}]},
        ],
    }
    monkeypatch.setattr(smoke, "_details", lambda: details)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.2")
    assert smoke.proxy_urls() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    details["http_options"]["host"] = "127.0.0.1"
    assert smoke.proxy_urls() == ["http://10.0.0.1:8000", "http://127.0.0.1:8000"]
    names = {smoke.smoke_app_name() for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("sd2-smoke-") and n != "sd2" for n in names)
