"""Fine-tuning on a real local Ray cluster with DeepSpeed ZeRO-2/3 on 2 CPU workers:
sparsity kept, loss down, 1-vs-2-worker parity, recovery from a worker failure, rerun after
a failed driver run, and checkpoints + model on a loopback S3 server."""
from __future__ import annotations

import os

import pytest
import torch

from sd2_ray import manifest, storage
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.toy import make_sparse_drafter, write_toy_dataset
from sd2_ray.finetune.trainer import run_finetune
from sd2_ray.models.io import load_model
from sd2_ray.models.sparsity import load_masks, masked_weights_nonzero

pytestmark = pytest.mark.ray

STEPS = 6
COMMON = dict(max_steps=STEPS, lr=3e-3, batch_size=8, seq_len=64, checkpoint_every=2, warmup_steps=1,
              # partition even the tiny model's weights, so ZeRO-3 really gathers
              deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    """One local Ray for the module. Its processes get the loopback S3 settings that the
    ``s3_bucket`` fixture sets later (Ray Data read tasks take their env from the cluster)."""
    import ray

    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
           or os.path.expanduser("~/.cache/sd2/torch_extensions"),
           "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # 2 training workers + room for Ray Data's read tasks (logical CPUs; the box has 2 cores)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = make_sparse_drafter(str(root / "pruned"), 0.5)
    data = write_toy_dataset(str(root / "data"), 64)
    return {"root": root, "model": model, "data": data}


def finetune(inputs, name: str, **kwargs) -> FinetuneConfig:
    """A config for the shared toy inputs, output under <root>/<name>/drafter."""
    return FinetuneConfig(model=kwargs.pop("model", inputs["model"]), data=kwargs.pop("data", inputs["data"]),
                          output=kwargs.pop("output", str(inputs["root"] / name / "drafter")),
                          **{**COMMON, **kwargs})


@pytest.fixture(scope="module")
def zero2_run(inputs):
    cfg = finetune(inputs, "zero2", workers=2, zero_stage=2)
    return run_finetune(cfg)


def assert_sparse_and_learned(result, input_model: str):
    out = storage.local_dir(result.output)
    masks = load_masks(out)
    assert masks and masks.keys() == load_masks(input_model).keys()
    tuned, original = load_model(out), load_model(input_model)
    assert masked_weights_nonzero(tuned, masks) == 0
    before = dict(original.named_parameters())
    for key, param in tuned.named_parameters():
        if key in masks:
            kept = masks[key]
            assert (param.detach()[~kept] == 0).all()
            assert (param.detach()[kept] != before[key].detach()[kept]).float().mean() > 0.9, key
    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert losses[-1] < losses[0] - 0.1
    assert result.summary["sparsity_check"]["verified"] is True
    assert manifest.is_complete(result.output)
    for name in ("config.yaml", "metrics.json", "sparsity.json", "masks.safetensors", "tokenizer.json"):
        assert storage.exists(storage.join(result.output, name)), name


def test_zero2_two_workers_keeps_sparsity_and_learns(zero2_run, inputs):
    assert_sparse_and_learned(zero2_run, inputs["model"])
    checked = [h for h in zero2_run.history if "masked_nonzero" in h]
    assert checked and all(h["masked_nonzero"] == 0 for h in checked)
    assert all(h["tokens_per_s"] > 0 and h["lr"] > 0 for h in zero2_run.history)
    ckpts = storage.list_files(str(inputs["root"] / "zero2" / "checkpoints" / "drafter"), recursive=True)
    assert any("/step-0000004/" in f for f in ckpts) and any("/final/model/" in f for f in ckpts)


def test_one_worker_matches_two_workers(zero2_run, inputs):
    one = run_finetune(finetune(inputs, "one", workers=1, zero_stage=2))
    two = [h["loss"] for h in zero2_run.history]
    assert [h["tokens"] for h in one.history] == [h["tokens"] for h in zero2_run.history]  # same batches
    torch.testing.assert_close(torch.tensor([h["loss"] for h in one.history]), torch.tensor(two),
                               rtol=1e-3, atol=1e-4)


def test_worker_failure_resumes_from_checkpoint(zero2_run, inputs, tmp_path):
    marker = str(tmp_path / "failed-once")
    cfg = finetune(inputs, "failing", workers=2, zero_stage=2)
    result = run_finetune(cfg, fail_once={"step": 3, "marker": marker})
    assert os.path.exists(marker)  # the failure did happen
    assert result.summary["restarts"] == 1
    # resumed at the step-2 checkpoint: steps 1-2 from the first attempt, 3.. after the restart
    assert [(h["step"], h["restarts"]) for h in result.history] == \
        [(1, 0), (2, 0)] + [(s, 1) for s in range(3, STEPS + 1)]
    baseline = zero2_run.summary["final_loss"]
    assert result.summary["final_loss"] == pytest.approx(baseline, rel=0.01)
    assert_sparse_and_learned(result, inputs["model"])


def test_rerun_after_failed_driver_run_resumes(inputs, tmp_path):
    """A run that dies (no retries left) leaves checkpoints; `sd2 finetune` again continues them."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    cfg = finetune(inputs, "rerun", workers=2, zero_stage=2, max_failures=0)
    with pytest.raises(TrainingFailedError):
        run_finetune(cfg, fail_once={"step": 5, "marker": str(tmp_path / "m")})
    assert manifest.read(cfg.output)["status"] == manifest.FAILED
    result = run_finetune(cfg)
    assert result.summary["restarts"] == 1
    assert [h["step"] for h in result.history if h["restarts"] == 1] == [5, 6]  # from the step-4 checkpoint
    assert manifest.is_complete(cfg.output)
    again = run_finetune(cfg)  # complete: skipped, same metrics
    assert again.skipped and again.summary["final_loss"] == result.summary["final_loss"]


def test_zero3_on_s3_keeps_sparsity_and_learns(inputs, s3_bucket):
    base = f"s3://{s3_bucket}/run"
    storage.copy_dir(inputs["model"], f"{base}/pruned")
    write_toy_dataset(f"{base}/distilled", 64)
    cfg = finetune(inputs, "zero3", workers=2, zero_stage=3, model=f"{base}/pruned",
                   data=f"{base}/distilled", output=f"{base}/drafter")
    result = run_finetune(cfg)
    assert_sparse_and_learned(result, inputs["model"])
    keys = storage.list_files(f"{base}/checkpoints/drafter", recursive=True)
    assert any("/step-0000004/" in k and "zero_pp_rank_1" in k for k in keys)  # both ranks' shards
    assert any(k.endswith("/final/model/model.safetensors") for k in keys)
    assert storage.exists(f"{base}/drafter/model.safetensors")
