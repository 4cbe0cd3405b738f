"""Device and dtype plumbing of the engine, eval, serve and the pipeline's eval step (CPU only:
no GPU here, so what can be checked is that nothing is created off the model's device, that
other dtypes run the same loop losslessly, and that device/dtype choices validate clearly)."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch

from sd2_ray.errors import ConfigError
from sd2_ray.specdec.engine import SpeculativeEngine
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.testing.engine_pairs import noisy_copy, sharpen
from sd2_ray.testing.tiny import tiny_model
from sd2_ray.testing.tokenizer import bpe_tokenizer, char_tokenizer


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only; a module-level set_grad_enabled(False) would leak into every later test file
    of the same process (fine-tuning tests then train nothing)."""
    with torch.no_grad():
        yield


SPECDEC = Path(__file__).resolve().parents[1] / "sd2_ray" / "specdec"
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "randn", "rand", "randint", "eye", "linspace"}
ON_CPU_GENERATOR = {"rand"}  # per-request generators live on the CPU by design (draws then moved)


def factory_calls_without_device(path: Path) -> list[str]:
    """``torch.<factory>(...)`` calls that name no device: they land on the default (CPU) device."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, name = node.func.value, node.func.attr
        if not (isinstance(owner, ast.Name) and owner.id == "torch" and name in FACTORIES):
            continue
        keywords = {k.arg for k in node.keywords}
        if "device" in keywords or (name in ON_CPU_GENERATOR and "generator" in keywords):
            continue
        bad.append(f"{path.name}:{node.lineno}: torch.{name}(...) without device=")
    return bad


def test_engine_sources_name_a_device_for_every_new_tensor():
    files = [
        SPECDEC / f
        for f in ("engine.py", "kv.py", "static_kv.py", "slot_cache.py", "steps.py", "sampling.py", "uag.py", "rows.py")
    ]
    calls = sum(len([n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)]) for f in files)
    assert calls > 100  # the scan really reads the engine
    assert [bad for f in files for bad in factory_calls_without_device(f)] == []


def test_the_scan_catches_a_tensor_without_device(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        "import torch\na = torch.zeros(3)\nb = torch.zeros(3, device=d)\n"
        "c = torch.tensor([1],\n  dtype=torch.long)\nd = torch.rand(2, generator=g)\n"
    )
    assert factory_calls_without_device(src) == [
        "x.py:2: torch.zeros(...) without device=",
        "x.py:4: torch.tensor(...) without device=",
    ]


@pytest.fixture(scope="module")
def pair():
    target = sharpen(tiny_model("llama", seed=0), 4.0)
    return target.eval(), noisy_copy(target, 0.5)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (2 + 3 * i,), generator=g).tolist() for i in range(n)]


def decode(engine: SpeculativeEngine, batch: list[list[int]], n: int = 20, **sampling):
    reqs = [GenerationRequest(p, n, SamplingParams(**sampling)) for p in batch]
    return [r.token_ids for r in engine.generate(reqs)]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("drafter_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_target_greedy_equals_target_only_greedy(pair, drafter_dtype):
    target = copy.deepcopy(pair[0]).to(torch.bfloat16)
    drafter = copy.deepcopy(pair[1]).to(drafter_dtype)
    batch = prompts(4)
    alone = decode(SpeculativeEngine(target, None, 0), batch)
    spec = SpeculativeEngine(target, drafter, 3)
    results = spec.generate([GenerationRequest(p, 20) for p in batch])
    assert [r.token_ids for r in results] == alone
    assert sum(r.stats.num_accepted_tokens for r in results) > 0  # the drafter really drafted


@pytest.mark.usefixtures("one_torch_thread")
def test_bfloat16_cross_tokenizer_greedy_is_lossless():
    t_tok, d_tok = char_tokenizer(), bpe_tokenizer()
    target = sharpen(tiny_model("llama", seed=0, vocab_size=len(t_tok)), 4.0).to(torch.bfloat16)
    drafter = tiny_model("qwen2", seed=1, vocab_size=len(d_tok)).to(torch.bfloat16)
    batch = [t_tok.encode(t) for t in ("hello there", "the cat sat on the")]
    alone = decode(SpeculativeEngine(target, None, 0, t_tok), batch, 16)
    assert decode(SpeculativeEngine(target, drafter, 3, t_tok, d_tok), batch, 16) == alone


@pytest.mark.usefixtures("one_torch_thread")
def test_seeded_sampling_is_reproducible_in_bfloat16(pair):
    target, drafter = (copy.deepcopy(m).to(torch.bfloat16) for m in pair)
    engine = SpeculativeEngine(target, drafter, 3)
    batch = prompts(3, seed=5)
    first = decode(engine, batch, temperature=1.0, seed=11)
    assert decode(engine, batch, temperature=1.0, seed=11) == first
    assert decode(engine, batch[:1], temperature=1.0, seed=11) == first[:1]  # independent of its batch


def test_from_dirs_with_an_explicit_cpu_device(tmp_path):
    from sd2_ray.testing.engine_pairs import tiny_pair_dirs

    target_dir, drafter_dir = tiny_pair_dirs(str(tmp_path))
    engine = SpeculativeEngine.from_dirs(target_dir, drafter_dir, 3, device="cpu", dtype=torch.bfloat16)
    assert engine.device == torch.device("cpu") and engine.drafter_device == torch.device("cpu")
    assert engine.target.dtype == torch.bfloat16 and engine.drafter.dtype == torch.bfloat16
    batch = prompts(2)
    assert decode(engine, batch) == decode(SpeculativeEngine(engine.target, None, 0), batch)
    # an accelerate device_map (here everything lands on the CPU) loads the same target
    mapped = SpeculativeEngine.from_dirs(target_dir, drafter_dir, 3, device_map="auto", dtype=torch.bfloat16)
    assert mapped.device == torch.device("cpu") and mapped.target.dtype == torch.bfloat16
    assert decode(mapped, batch) == decode(engine, batch)


# ---- device / dtype names -------------------------------------------------------------------


def test_device_and_dtype_resolution_here():
    from sd2_ray.models.device import resolve_device, resolve_dtype

    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ConfigError, match="field 'dtype': 'int8' is not one of"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="field 'serve.device': cuda:7 requested but"):
        resolve_device("cuda:7", field="serve.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_config_error_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    from sd2_ray.cli import main as cli_main

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out"
    code = cli_main(
        [
            "eval",
            "--target",
            tiny_model_dir,
            "--drafter",
            tiny_model_dir,
            "--prompts",
            str(prompts_file),
            "--output",
            str(out),
            "--device",
            "cuda",
        ]
    )
    assert code == 2 and not out.exists()
    assert "field 'device': cuda requested but CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"device": "gpu"}, "field 'device': 'gpu' is not a device"),
        ({"device": "cuda:x"}, "field 'device'"),
        ({"dtype": "fp16"}, "field 'dtype'"),
        ({"gpus": 1, "device": "cpu"}, "gpus > 0 reserves GPUs that device 'cpu' never uses"),
        ({"gpus": -1}, "field 'gpus'"),
    ],
)
def test_eval_config_rejects_bad_placement(fields, message):
    from sd2_ray.config import validate
    from sd2_ray.evaluate.config import EvalConfig

    base = {"target": "t", "drafter": "d", "prompts": "p", "output": "o"}
    with pytest.raises(ConfigError) as err:
        validate(EvalConfig, {**base, **fields})
    assert message in str(err.value)


def test_eval_config_defaults_are_auto_and_accept_gpus():
    from sd2_ray.evaluate.config import EvalConfig

    cfg = EvalConfig(target="t", drafter="d", prompts="p", output="o", device="cuda:1", gpus=1, device_map="auto")
    assert (cfg.device, cfg.dtype, cfg.gpus, cfg.device_map) == ("cuda:1", "auto", 1, "auto")
    assert EvalConfig(target="t", drafter="d", prompts="p", output="o").device == "auto"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"device": "tpu"}, "field 'device'"),
        ({"engine": "vllm", "gpus_per_replica": 1}, "gpus_per_replica applies to engine 'transformers'"),
        ({"engine": "vllm", "device": "cuda"}, "device applies to engine 'transformers'"),
        ({"gpus_per_replica": 2, "device": "cpu"}, "gpus_per_replica > 0 reserves GPUs"),
    ],
)
def test_serve_config_rejects_bad_placement(fields, message):
    from sd2_ray.config import validate
    from sd2_ray.serve.config import ServeConfig

    with pytest.raises(ConfigError) as err:
        validate(ServeConfig, {"target": "t", **fields})
    assert message in str(err.value)


def test_serve_replicas_ask_ray_for_their_gpus():
    from sd2_ray.serve.app import deployment_options
    from sd2_ray.serve.config import ServeConfig

    cpu = deployment_options(ServeConfig(target="t"))["ray_actor_options"]
    gpu = deployment_options(ServeConfig(target="t", gpus_per_replica=2, device_map="auto"))["ray_actor_options"]
    assert "num_gpus" not in cpu and gpu == {"num_cpus": 1.0, "num_gpus": 2}


# ---- the pipeline's eval step as Ray tasks ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_with_a_declared_gpu():
    """A local Ray that *declares* one GPU (there is none): tasks asking for num_gpus=1 get
    scheduled, and device auto falls back to the CPU inside them."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_pipeline_eval_in_gpu_tasks_matches_the_embedded_eval(tmp_path, ray_with_a_declared_gpu, monkeypatch):
    from sd2_ray.evaluate import fanout
    from sd2_ray.pipeline.chain import eval_config, eval_root
    from sd2_ray.pipeline.config import PipelineConfig
    from sd2_ray.testing.engine_pairs import tiny_pair_dirs

    target_dir, drafter_dir = tiny_pair_dirs(str(tmp_path / "models"))
    prompts_file = tmp_path / "eval.jsonl"
    prompts_file.write_text(
        "".join(
            json.dumps({"id": str(i), "messages": [{"role": "user", "content": text}]}) + "\n"
            for i, text in enumerate(["hello there", "the cat", "An answer"])
        )
    )
    eval_section = {"max_new_tokens": 12, "batch_size": 2, "measure_baseline": True}
    reports = {}
    for gpus in (0, 1):
        config = PipelineConfig.load(
            None,
            {
                "output": str(tmp_path / f"run{gpus}"),
                "num_speculative_tokens": 3,
                "target": target_dir,
                "drafter": drafter_dir,
                "eval_prompts": str(prompts_file),
                "eval": {**eval_section, "gpus": gpus},
            },
        )
        if gpus:  # the driver must not evaluate anything itself
            monkeypatch.setattr(fanout, "_evaluate_here", lambda *a: pytest.fail("evaluated in the driver"))
        reports[gpus] = fanout.evaluate_drafters({"dense": eval_config(config, "dense")}, eval_root(config))["dense"]
        assert (
            json.loads((tmp_path / f"run{gpus}" / "eval" / "dense" / "manifest.json").read_text())["status"]
            == "complete"
        )
        assert (tmp_path / f"run{gpus}" / "eval" / "target-only.json").exists()
    for key in ("outputs", "mean_accepted_length", "num_accepted_tokens", "lossless", "dtype", "device"):
        assert reports[0][key] == reports[1][key], key
    assert reports[1]["lossless"] and reports[1]["num_prompts"] == 3
    assert (reports[0]["dtype"], reports[0]["device"]) == ("float32", "cpu")


def test_sd2_eval_with_gpus_runs_as_a_ray_task(tmp_path, ray_with_a_declared_gpu, monkeypatch):
    from sd2_ray.evaluate import job
    from sd2_ray.evaluate.config import EvalConfig
    from sd2_ray.testing.engine_pairs import tiny_pair_dirs

    target_dir, drafter_dir = tiny_pair_dirs(str(tmp_path / "models"))
    prompts_file = tmp_path / "eval.jsonl"
    prompts_file.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hello"}]}) + "\n")
    import os

    real = job.evaluate_pair  # tagged with the pid of the process that ran it (shipped by value)
    monkeypatch.setattr(job, "evaluate_pair", lambda *a, **k: {**real(*a, **k), "pid": os.getpid()})
    config = EvalConfig(
        target=target_dir,
        drafter=drafter_dir,
        prompts=str(prompts_file),
        output=str(tmp_path / "out"),
        max_new_tokens=8,
        gpus=1,
    )
    report = job.main(config)
    assert report["pid"] != os.getpid()  # evaluated in a Ray task, not in the driver
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["lossless"] and saved["mean_accepted_length"] == report["mean_accepted_length"]
    assert (saved["device"], saved["dtype"]) == ("cpu", "float32")


def test_tune_trial_eval_with_eval_gpus_runs_as_a_ray_task(tmp_path, ray_with_a_declared_gpu, monkeypatch):
    import os

    import sd2_ray.evaluate.core as core
    from sd2_ray.testing.engine_pairs import tiny_pair_dirs
    from sd2_ray.tune import trial
    from sd2_ray.tune.config import TuneConfig

    target_dir, drafter_dir = tiny_pair_dirs(str(tmp_path / "models"))
    prompts_file = tmp_path / "eval.jsonl"
    prompts_file.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hello"}]}) + "\n")
    settings = dict(
        output=str(tmp_path / "tune"),
        target=target_dir,
        drafter=drafter_dir,
        data=str(prompts_file),
        eval_prompts=str(prompts_file),
        eval_max_new_tokens=6,
        num_speculative_tokens=3,
    )
    real = core.evaluate_pair  # tagged with the pid of the process that ran it (shipped by value)
    monkeypatch.setattr(core, "evaluate_pair", lambda *a, **k: {**real(*a, **k), "pid": os.getpid()})
    here = trial.evaluate(TuneConfig(**settings), drafter_dir)
    remote = trial.evaluate(TuneConfig(**settings, eval_gpus=1, eval_device="auto"), drafter_dir)
    assert here["pid"] == os.getpid() and remote["pid"] != os.getpid()
    assert remote["outputs"] == here["outputs"] and remote["device"] == "cpu"
