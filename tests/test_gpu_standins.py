"""What only a GPU run would show, shown on the CPU: a training step whose engine lives on another
device than the CPU (the ``meta`` device stands in for CUDA: a CPU tensor fed to it fails, as it
would on a GPU), gradient masks kept on the gradient's device and dtype, and a Ray Tune search on
a Ray that *declares* 4 GPUs (placement as on a GPU cluster; the CUDA work itself runs on CPU)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from sd2_ray.finetune import masking, report_clock, step
from sd2_ray.finetune.losses import LossSpec, LossSums
from sd2_ray.testing.tokenizer import toy_tokenizer
from sd2_ray.testing.toy import magnitude_masks, toy_rows, toy_worker_config


class MetaEngine:
    """A DeepSpeed engine stand-in on the meta device: every tensor it is fed must be there."""

    device = torch.device("meta")

    def __init__(self):
        self.forwards = 0
        # DeepSpeed's engine.module: the loss module, whose last sums the step reads
        self.module = SimpleNamespace(spec=LossSpec(), last=None)

    def __call__(self, **batch):
        for name, tensor in batch.items():
            assert tensor.device == self.device, f"{name} on {tensor.device}, the engine is on {self.device}"
        self.forwards += 1
        total = torch.tensor(float(batch["labels"].shape[0]))  # the step reads .item(): a CPU scalar
        self.module.last = LossSums(total=total, ce=float(total), kd=0.0, ce_tokens=1, kd_tokens=0)
        return total

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_lr(self):
        return [1e-3]


def test_train_step_feeds_the_engine_on_its_device():
    """Before the fix the collated batches stayed on the CPU and a CUDA engine failed in the
    embedding (a batch left on the CPU fails as on CUDA)."""
    engine, worker = MetaEngine(), toy_worker_config(seq_len=48, workers=1, grad_accum=2)
    metrics = step.train_step(engine, toy_rows(8), toy_tokenizer(), worker, rank=0, world=1)
    assert engine.forwards == 2 and metrics["tokens"] > 0


class CollectiveReached(Exception):
    """The stand-in collective accepted its tensor (the meta device cannot be read back)."""


def nccl_like(monkeypatch, device: torch.device):
    """A 2-rank process group whose collectives, like NCCL's, reject tensors off ``device``
    (NCCL: "No backend type associated with device type cpu")."""
    import torch.distributed as dist

    def collective(tensor, *args, **kwargs):
        assert tensor.device == device, f"collective on {tensor.device}: no backend for it (NCCL is on {device})"
        raise CollectiveReached

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(dist, "broadcast", collective)


def test_collectives_run_on_the_engines_device(monkeypatch):
    """The step's token-count all-reduce and report_due's agreed clock are collectives; under
    NCCL their tensors must live on the engine's device. Before the fix both were float64 CPU
    tensors (train_loop._all_reduce and the report_due broadcast)."""
    nccl_like(monkeypatch, MetaEngine.device)
    worker = toy_worker_config(seq_len=48, workers=2, grad_accum=1)
    with pytest.raises(CollectiveReached):
        step.train_step(MetaEngine(), toy_rows(4), toy_tokenizer(), worker, rank=0, world=2)
    with pytest.raises(CollectiveReached):
        report_clock.report_due(1, 1.0, 3, 10, 0.0, 2, MetaEngine.device)


def test_gradient_mask_is_bit_packed_and_never_converted_per_backward():
    """A mask meets gradients of the training dtype (bf16) on its own device: it stays 1 bit per
    weight, is unpacked per gradient, and is never copied (no host->device copy per step;
    full-size masks in the parameter's dtype cost a 3B drafter 5.6-11 GB a GPU)."""
    keep = torch.tensor([[True, False], [False, True]])
    masker = masking._Masker(masking.PackedMask.of(keep))
    assert masker.keep.bits.dtype == torch.uint8 and masker.keep.nbytes == 1
    for _ in range(4):
        grad = masker(torch.ones(2, 2, dtype=torch.bfloat16))
        assert grad.dtype == torch.bfloat16 and grad.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert masker.conversions == 0


def test_masks_registered_on_a_placed_model_never_convert(tiny_llama):
    """The worker places the drafter before registering the hooks, so each mask is built in the
    gradient's device and dtype from the start; the zeros hold through backward."""
    masks = magnitude_masks(tiny_llama, 0.5)
    model = tiny_llama.to(torch.bfloat16).train()
    params = dict(model.named_parameters())
    maskers = [masking._Masker(masking.PackedMask.of(m, params[k].device)) for k, m in masks.items()]
    handles = [params[k].register_hook(h) for k, h in zip(masks, maskers, strict=True)]
    ids = torch.randint(3, 90, (2, 12))
    for _ in range(3):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    for key, mask in masks.items():
        assert (params[key].grad[~mask] == 0).all()
    assert all(m.conversions == 0 for m in maskers)
    masking.remove_hooks(handles)


@pytest.fixture(scope="module")
def ray_with_4_declared_gpus():
    """A local Ray that *declares* 4 GPUs: tasks asking for GPUs are placed as on a GPU node."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=4,
        num_gpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow  # a whole search (~1.5 min); the small-cluster tune tests place GPU evals the same way
@pytest.mark.timeout(1800)
def test_search_places_its_gpu_tasks_outside_the_trials_cpu_bundles(ray_with_4_declared_gpus, kit_dir, tmp_path):
    """Configured like gpu-tune.yaml: each trial's prune task and eval task (and the checkpoint
    evals run from the Train controller) ask for GPUs while the trial holds only a CPU bundle.
    Before the fix they asked inside the trial's placement group and never got scheduled (issue
    16.5). Here every one runs, on CPU where no CUDA exists, and the search finishes."""
    from sd2_ray.kit import kit_paths
    from sd2_ray.tune.config import TuneConfig
    from sd2_ray.tune.job import main

    parts = kit_paths(kit_dir)
    config = TuneConfig(
        output=str(tmp_path / "tune"),
        target=parts["target"],
        drafter=parts["drafter"],
        data=parts["train_prompts"],
        eval_prompts=parts["eval_prompts"],
        max_concurrent=1,
        max_steps=4,
        max_eval_prompts=4,
        eval_max_new_tokens=16,
        eval_gpus=1,
        eval_device="auto",
        eval_at_checkpoints=True,
        checkpoint_eval_prompts=2,
        asha={"enabled": False},
        search_space={"sparsity": [0.5], "lr": [1e-3]},
        prune={"method": "sparsegpt", "num_samples": 8, "seq_len": 64, "num_gpus": 1, "device": "cpu"},
        finetune={"workers": 1, "batch_size": 4, "seq_len": 64, "checkpoint_every": 2},
    )
    summary = main(config)
    assert summary["completed"] == 1 and summary["errored"] == 0, summary
    best = summary["best"]
    assert 1.0 <= best["mal"] <= 5.0


def test_chunked_loss_agrees_its_chunk_count_on_the_engines_device(monkeypatch):
    """Under ZeRO-3 every LM-head call gathers the head's partitioned weight (a collective), so
    the ranks must agree how many chunks they run; the agreement is itself a collective and must
    run on the engine's device. Without it, 2 ranks with different numbers of labelled positions
    deadlocked in the first backward."""
    from sd2_ray.finetune.losses import chunk_starts

    head = torch.nn.Linear(4, 8, bias=False)
    assert list(chunk_starts(5, 2, head, MetaEngine.device)) == [0, 2, 4]  # not partitioned: local count
    head.weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    nccl_like(monkeypatch, MetaEngine.device)
    with pytest.raises(CollectiveReached):
        chunk_starts(5, 2, head, MetaEngine.device)


def test_held_out_acceptance_without_top_k_still_joins_the_chunk_agreement(monkeypatch):
    """A rank whose held-out micro-batch has no stored top-k returned before the agreement its
    peers entered (a deadlock under ZeRO-3); it now joins it and runs the agreed empty chunks."""
    from sd2_ray.finetune.acceptance import acceptance_sums

    head = torch.nn.Linear(4, 8, bias=False)
    head.weight.ds_id = 0
    nccl_like(monkeypatch, MetaEngine.device)
    hidden = torch.zeros(1, 3, 4, device=MetaEngine.device)
    with pytest.raises(CollectiveReached):
        acceptance_sums(hidden, {"labels": torch.zeros(1, 3, dtype=torch.long)}, 4, head=head)
