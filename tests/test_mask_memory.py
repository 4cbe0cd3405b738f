"""Memory a GPU run spends that no CPU run notices, measured on CPU by tensor accounting: the
masks the gradient hooks keep, the dtype the drafter is loaded in, the calibration states
pruning keeps alive, and what `sd2 plan` counts of all that (a 3B drafter, ZeRO-3, bf16)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from sd2_ray.finetune import masking
from sd2_ray.testing.toy import magnitude_masks, make_sparse_drafter, toy_worker_config

REPO = Path(__file__).resolve().parents[1]


def hook_state_bytes(handles: list) -> int:
    """Bytes of the masks the registered gradient hooks hold."""
    total = 0
    for handle in handles:
        keep = handle.hooks_dict_ref()[handle.id].keep
        packed = isinstance(keep, getattr(masking, "PackedMask", ()))
        total += keep.nbytes if packed else keep.numel() * keep.element_size()
    return total


def test_gradient_hooks_hold_one_bit_per_masked_weight(tiny_llama):
    """A bf16 drafter's hooks used to hold each mask in the parameter's dtype (2 bytes a weight;
    fp32: 4), on every GPU: 5.6-11 GB for a 3B drafter. Now 1 bit, unpacked per gradient."""
    masks = magnitude_masks(tiny_llama, 0.5)
    model = tiny_llama.to(torch.bfloat16)
    handles = masking.register_gradient_masks(model, masks)
    weights = sum(m.numel() for m in masks.values())
    assert hook_state_bytes(handles) <= weights / 8 + len(masks)
    ids = torch.randint(3, 90, (2, 12))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    assert all((params[k].grad[~m] == 0).all() for k, m in masks.items())
    masking.remove_hooks(handles)


def test_packed_masks_round_trip_and_slice_like_zero3_partitions():
    keep = torch.rand(7, 13) > 0.5
    packed = masking.PackedMask.of(keep)
    assert torch.equal(packed.unpack(), keep) and packed.kept() == int(keep.sum())
    flat = keep.reshape(-1)
    for start, count in [(0, 91), (5, 17), (45, 46), (90, 1), (91, 0)]:
        assert torch.equal(packed.flat(start, count), flat[start : start + count])


def test_drafter_is_loaded_in_the_training_dtype(tmp_path):
    """Each rank loaded the drafter in fp32 before DeepSpeed cast it to bf16: 12.9 GB per GPU
    for a 3B drafter instead of 6.4 GB."""
    from sd2_ray.finetune import session

    model_dir = make_sparse_drafter(str(tmp_path / "m"), 0.5)
    worker = toy_worker_config(model_dir, deepspeed={"bf16": {"enabled": True}}, gradient_checkpointing=True)
    model, _, masks = session.load_drafter(worker, torch.device("cpu"))
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in params) == 2 * sum(p.numel() for p in params)
    assert all(isinstance(m, masking.PackedMask) for m in masks.values())
    assert masking.count_masked_nonzero(model, masks) == 0
    fp32 = worker.model_copy(update={"deepspeed_config": {}})
    assert next(session.load_drafter(fp32, torch.device("cpu"))[0].parameters()).dtype == torch.float32


def live_hidden_states(shape: tuple[int, ...]) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape)


def test_pruning_keeps_each_calibration_sample_once(tiny_llama):
    """Replacing a block's inputs by its outputs built a second list: every sample's fp32
    hidden state twice (12.9 GB for 512 x 2048 tokens of a 3B model)."""
    from types import SimpleNamespace

    from sd2_ray.prune.sequential import decoder_blocks, prune_model

    samples, length = 6, 16
    _, blocks = decoder_blocks(tiny_llama)
    shape = (1, length, tiny_llama.config.hidden_size)
    peaks = []
    handle = blocks[-1].register_forward_pre_hook(lambda *_: peaks.append(live_hidden_states(shape)))
    config = SimpleNamespace(
        method="sparsegpt",
        targets=["re:.*layers.*proj"],
        ignore=[],
        nm=None,
        target_sparsity=0.5,
        block_size=8,
        dampening=0.01,
        pattern="unstructured",
    )
    batches = [torch.randint(3, 90, (1, length)) for _ in range(samples)]
    with torch.no_grad():
        prune_model(tiny_llama, batches, config)
    handle.remove()
    assert peaks and max(peaks) <= samples + 2, peaks


def test_plan_counts_what_a_3b_zero3_bf16_rank_holds():
    """Before: 13.0 GB for Llama-3.2-3B on 8 GPUs (ZeRO-3, bf16, micro-batch 2 x 2048), with no
    masks, no model load and no live gathered parameters counted."""
    from sd2_ray.finetune.config import FinetuneSettings
    from sd2_ray.plan.estimate import finetune_need
    from sd2_ray.plan.shapes import KNOWN, shape_from_config

    shape = shape_from_config(KNOWN["llama-3.2-3b"], "test")
    settings = FinetuneSettings(
        workers=8,
        use_gpu=True,
        zero_stage=3,
        batch_size=64,
        grad_accum=4,
        seq_len=2048,
        gradient_checkpointing=True,
        deepspeed={"bf16": {"enabled": True}},
    )
    need = finetune_need(shape, settings)
    masks = need.gpu_gb["masks (1 bit per prunable weight)"]
    assert 0.3 < masks < 0.6  # 2.8 B prunable weights / 8, plus one unpacked
    assert need.gpu_gb["ZeRO-3 live gathered parameters"] == pytest.approx(2.0)
    assert need.load_gb == pytest.approx(6.4 + masks, abs=0.1)  # the bf16 model before partitioning
    assert 14.5 < need.per_gpu_gb < 16.5
    fp32 = finetune_need(shape, settings.model_copy(update={"deepspeed": {}}))
    assert fp32.load_gb == pytest.approx(12.9 + masks, abs=0.1)


def test_shipped_configs_fit_the_a10g_alternative(tmp_path, capsys):
    """aws-gpu.yaml names g5.12xlarge (4 x A10G 24 GB) for drafters up to 3B: the 3B fine-tune
    must fit it with the memory now counted."""
    import yaml

    from sd2_ray.cli import main as cli

    cluster = yaml.safe_load((REPO / "clusters/aws-gpu.yaml").read_text())
    cluster["available_node_types"]["gpu_train"]["node_config"]["InstanceType"] = "g5.12xlarge"
    del cluster["available_node_types"]["gpu_generate"]  # nothing else to fall back on
    path = tmp_path / "a10g.yaml"
    path.write_text(yaml.safe_dump(cluster))
    config = yaml.safe_load((REPO / "jobs/configs/llama70b_to_llama3b.yaml").read_text())
    config = {
        k: v
        for k, v in config.items()
        if k in ("output", "target", "drafter", "train_prompts", "eval_prompts", "num_speculative_tokens", "finetune")
    }
    config["prune"] = {"method": "magnitude", "num_gpus": 0}
    config["eval"] = {"gpus": 0}
    config["serve"] = {"engine": "transformers", "gpus_per_replica": 0}
    config["distill"] = {"engine": "transformers"}
    planned = tmp_path / "p.yaml"
    planned.write_text(yaml.safe_dump(config))
    assert cli(["plan", "--config", str(planned), "--cluster", str(path)]) == 0, capsys.readouterr().err
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| finetune"))
    assert "gpu_train" in row and "/ 24" in row
