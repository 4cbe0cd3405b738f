"""Everything the GPU configs turn on, together, on 2 CPU ranks (gloo): bf16 + ZeRO-3 +
gradient checkpointing + the chunked LM-head loss + a ZeRO checkpoint saved and restored into
a fresh engine + the gathered HF save. The restored run's next steps must equal the
uninterrupted run's, the masks must stay exact, and they must cost 1 bit per weight."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sd2_ray.testing.toy import make_sparse_drafter, toy_rows


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.worker_config import worker_config
    from sd2_ray.testing.zero_ranks import restore_scenario, run_ranks

    root = tmp_path_factory.mktemp("z3bf16")
    model = make_sparse_drafter(str(root / "pruned"), 0.5)
    config = FinetuneConfig(
        model=model,
        data=str(root / "unused"),
        output=str(root / "out"),
        workers=2,
        zero_stage=3,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=1,
        gradient_checkpointing=True,
        loss_chunk_tokens=16,
        use_response_ids=False,
        deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    worker = worker_config(config, total_steps=4)
    out = str(root / "run")
    results = run_ranks(restore_scenario, 2, worker, toy_rows(32), out)
    return {"results": results, "out": out, "input": model}


def test_restored_run_continues_exactly_where_the_uninterrupted_one_went(scenario):
    for rank in scenario["results"]:
        assert rank["loaded_dtype"] == "torch.bfloat16"  # loaded in the training dtype, not fp32
        assert rank["restored_step"] == 2
        assert len(rank["uninterrupted"]) == 4 and len(rank["restored"]) == 2
        torch.testing.assert_close(
            torch.tensor(rank["restored"]), torch.tensor(rank["uninterrupted"][2:]), rtol=0, atol=1e-6
        )
        assert rank["uninterrupted"][-1] < rank["uninterrupted"][0]


def test_masks_stay_exact_and_cost_one_bit_per_weight(scenario):
    for rank in scenario["results"]:
        assert rank["masked_nonzero"] == 0
        # counted on each rank's own partition, summed over the ranks; nothing gathered
        assert rank["gathers_to_count"] == 0 and rank["poked_count"] == 2
        assert rank["mask_bytes"] * 8 <= rank["masked_numel"] + 8 * 64  # bit-packed (+ padding per tensor)


def test_gathered_save_is_the_trained_sparse_drafter(scenario):
    from sd2_ray.models.io import load_model
    from sd2_ray.models.sparsity import load_masks, masked_weights_nonzero

    saved = os.path.join(scenario["out"], "model")
    assert json.load(open(os.path.join(saved, "config.json")))["dtype"] == "bfloat16"
    model, original = load_model(saved), load_model(scenario["input"])
    masks = load_masks(scenario["input"])
    assert masked_weights_nonzero(model, masks) == 0
    before = dict(original.named_parameters())
    for key, param in model.named_parameters():
        assert param.abs().sum() > 0, key  # every tensor gathered, none left as an empty partition
        if key in masks:
            kept = masks[key]
            assert (param.detach()[kept] != before[key].detach()[kept]).float().mean() > 0.5, key
