"""Fine-tuning stage, pure pieces (no Ray, no DeepSpeed): tokenization, masks, schedule, checks."""

from __future__ import annotations

import json

import pytest
import torch

from sd2_ray.errors import ConfigError, DataError
from sd2_ray.finetune import data as D
from sd2_ray.finetune import masking
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.deepspeed_config import fill_deepspeed_config, zero_template
from sd2_ray.finetune.optimizer import lr_factor, param_groups
from sd2_ray.testing.tokenizer import toy_tokenizer
from sd2_ray.testing.toy import magnitude_masks, make_sparse_drafter, toy_rows, write_toy_dataset


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def test_encode_row_labels_only_the_response(tok):
    row = {"id": "r1", "messages": [{"role": "user", "content": "repeat beta 2 times"}], "response": "beta beta"}
    ex = D.encode_row(row, tok, seq_len=128)
    prompt = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.input_ids[: len(prompt)]) == prompt
    labelled = [t for t in ex.labels if t != D.IGNORE_INDEX]
    assert tok.decode(labelled) == "beta beta</s>"
    assert ex.labels[: len(prompt)] == [D.IGNORE_INDEX] * len(prompt)
    assert len(ex.input_ids) == len(ex.labels) == len(prompt) + len("beta beta") + 1


def test_encode_row_truncates_prompt_first(tok):
    row = {"prompt": "x" * 100, "response": "abcdef"}
    ex = D.encode_row(row, tok, seq_len=20)
    assert len(ex.input_ids) == 20
    assert tok.decode([t for t in ex.labels if t != D.IGNORE_INDEX]) == "abcdef</s>"


def test_response_field_and_trailing_assistant_message(tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert D.response_of(row) == "hello"
    assert D.response_of({"prompt": "p", "reference": "r"}, "reference") == "r"
    assert D.row_error({"prompt": "p"}, "response") == "row has no 'response'"
    with pytest.raises(DataError, match="row 'x'"):
        D.encode_row({"id": "x", "prompt": "p", "response": ""}, tok, 32)


def test_collate_pads_with_zero_attention_and_ignored_labels(tok):
    rows = toy_rows(3, seed=1)
    examples = D.encode_rows(rows, tok, 64)
    batch = D.collate(examples, tok.pad_token_id)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == D.IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()


def test_rank_slices_rebuild_the_global_batch():
    rows = list(range(12))
    assert [x for r in range(3) for x in D.rank_slice(rows, r, 3)] == rows
    assert D.micro_batches([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]


def test_token_weighted_scaling_makes_n_ranks_equal_one(tok, tiny_llama):
    """The loss scale used in train_step: N ranks x accumulation == 1 rank, given DeepSpeed's
    division by grad_accum and averaging over ranks (simulated here)."""
    batch_rows = toy_rows(8, seed=2)

    def grads(world: int, accum: int) -> torch.Tensor:
        tiny_llama.zero_grad()
        micro = [
            [
                D.collate(D.encode_rows(c, tok, 64), 0)
                for c in D.micro_batches(D.rank_slice(batch_rows, r, world), accum)
            ]
            for r in range(world)
        ]
        total = sum(D.labelled_tokens(b["labels"]) for rank in micro for b in rank)
        for rank in micro:
            for b in rank:
                out = tiny_llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                loss = D.token_loss_sum(out.logits, b["labels"]) * world * accum / total
                (loss / accum / world).backward()  # what DeepSpeed does with it
        return torch.cat([p.grad.flatten() for p in tiny_llama.parameters()])

    torch.testing.assert_close(grads(2, 2), grads(1, 1), rtol=1e-4, atol=1e-6)


def test_gradient_masks_keep_zeros_through_adamw(tiny_llama, tok):
    masks = magnitude_masks(tiny_llama, 0.5)
    from sd2_ray.models.sparsity import apply_masks, masked_weights_nonzero

    apply_masks(tiny_llama, masks)
    before = {k: v.detach().clone() for k, v in tiny_llama.named_parameters()}
    handles = masking.register_gradient_masks(tiny_llama, masks)
    opt = torch.optim.AdamW(param_groups(tiny_llama, 0.1), lr=1e-2)
    batch = D.collate(D.encode_rows(toy_rows(4), tok, 64), 0)
    for _ in range(3):
        opt.zero_grad()
        out = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        D.token_loss_sum(out.logits, batch["labels"]).backward()
        opt.step()
    assert masked_weights_nonzero(tiny_llama, masks) == 0
    params = dict(tiny_llama.named_parameters())
    for key, mask in masks.items():
        assert not torch.equal(params[key].detach()[mask], before[key][mask])  # kept weights learned
    masking.remove_hooks(handles)


def test_prepare_masks_rejects_mismatched_masks(tmp_path):
    from sd2_ray.models.io import load_model
    from sd2_ray.models.sparsity import save_masks

    d = make_sparse_drafter(str(tmp_path / "m"), 0.5)
    model = load_model(d)
    masks = masking.prepare_masks(d, model)
    assert masking.mask_summary(masks)["masked_fraction"] == pytest.approx(0.5)
    key = next(iter(masks))
    save_masks(d, {key: torch.ones(3, 3, dtype=torch.bool)}, {"layers": {}})
    with pytest.raises(DataError, match="has shape"):
        masking.prepare_masks(d, model)
    save_masks(d, {"model.nope.weight": torch.ones(3, 3, dtype=torch.bool)}, {"layers": {}})
    with pytest.raises(DataError, match="names no parameter"):
        masking.prepare_masks(d, model)


def test_lr_schedule():
    assert lr_factor(0, 2, 10) == 0.5 and lr_factor(1, 2, 10) == 1.0
    assert lr_factor(2, 2, 10) == pytest.approx(1.0)
    assert lr_factor(10, 2, 10) == pytest.approx(0.0)
    assert lr_factor(10, 2, 10, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(7, 0, 10, "constant") == 1.0


def test_deepspeed_templates_are_package_data_and_fill():
    for stage in (2, 3):
        template = zero_template(stage)
        assert template["zero_optimization"]["stage"] == stage
        ds = fill_deepspeed_config(
            template,
            zero_stage=stage,
            batch_size=8,
            micro_batch=2,
            grad_accum=2,
            grad_clip=1.0,
            optimizer="deepspeed_adamw",
            lr=1e-4,
            weight_decay=0.0,
            overrides={"zero_optimization": {"overlap_comm": True}},
        )
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
            8,
            2,
            2,
        )
        assert ds["zero_optimization"]["stage"] == stage and ds["zero_optimization"]["overlap_comm"] is True
        assert ds["optimizer"]["type"] == "AdamW"
        assert "auto" not in json.dumps(ds)


def test_config_checks_global_batch():
    with pytest.raises(ConfigError, match="batch_size"):
        FinetuneConfig.load(None, {"model": "m", "data": "d", "output": "o", "workers": 3, "batch_size": 8})
    cfg = FinetuneConfig(model="m", data="d", output="/x/out", workers=2, batch_size=8, grad_accum=2)
    assert cfg.micro_batch == 2
    assert cfg.checkpoint_run_dir() == "/x/out/_checkpoints/out"  # every artifact under the output


@pytest.fixture
def drafter_and_data(tmp_path):
    return make_sparse_drafter(str(tmp_path / "pruned"), 0.5), str(tmp_path)


def _cli(argv, capsys):
    from sd2_ray.cli import main

    code = main(["finetune", *argv])
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_give_one_line_errors(drafter_and_data, capsys):
    import pyarrow as pa

    from sd2_ray import storage
    from sd2_ray.models.sparsity import save_masks

    model, root = drafter_and_data
    out = f"{root}/out"
    empty = f"{root}/empty"
    storage.write_parquet(
        f"{empty}/part-0.parquet",
        pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string()), ("response", pa.string())])),
    )
    code, err = _cli(["--model", model, "--data", empty, "--output", out], capsys)
    assert code == 2 and "no usable rows (0 skipped)" in err and "\n" not in err

    noresp = f"{root}/noresp"
    rows = toy_rows(6)
    for row in rows:
        row["response"] = None
    storage.write_parquet(f"{noresp}/part-0.parquet", pa.Table.from_pylist(rows))
    code, err = _cli(["--model", model, "--data", noresp, "--output", out], capsys)
    assert (
        code == 2
        and "no usable rows (6 skipped; e.g. row 1 (id 'toy-0'): row has no 'response')" in err
        and "\n" not in err
    )

    good = write_toy_dataset(f"{root}/good", 16)
    save_masks(model, {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)}, {"layers": {}})
    code, err = _cli(["--model", model, "--data", good, "--output", out], capsys)
    assert code == 2 and "has shape (2, 2)" in err and "\n" not in err

    code, err = _cli(["--model", f"{root}/nowhere", "--data", good, "--output", out], capsys)
    assert code == 2 and "model directory not found" in err
    assert not storage.exists(f"{out}/manifest.json")  # nothing started for bad input


def test_reports_are_spaced_in_time_but_never_past_the_last_step(monkeypatch):
    from sd2_ray.finetune import report_clock

    now = [100.0]
    cpu = torch.device("cpu")
    monkeypatch.setattr(report_clock.time, "monotonic", lambda: now[0])
    due = report_clock.report_due
    assert not due(1, 2.0, 3, 10, last_report=99.0, world=1, device=cpu)  # 1 s after the last
    now[0] = 101.5
    assert due(1, 2.0, 3, 10, last_report=99.0, world=1, device=cpu)
    assert not due(1, 2.0, 10, 10, last_report=0.0, world=1, device=cpu)  # the final report does it
    assert not due(4, 2.0, 3, 10, last_report=0.0, world=1, device=cpu)  # report_every 4
    assert due(1, 0.0, 3, 10, last_report=now[0], world=1, device=cpu)  # no interval


def test_a_stale_extension_build_lock_is_named_not_waited_on_forever(tmp_path):
    """A DeepSpeed op build killed midway leaves torch's lock file; later builds used to wait on
    it silently. A live build's lock is waited for; one that outlives the patience is named."""
    import threading

    from sd2_ray.errors import Sd2Error
    from sd2_ray.finetune.extensions import wait_for_build_locks

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with pytest.raises(Sd2Error, match="deepspeed_shm_comm/lock.*delete the lock file"):
        wait_for_build_locks(patience_s=0.5, poll_s=0.1, root=str(tmp_path))
    threading.Timer(0.3, lock.unlink).start()  # a build that finishes while we wait
    wait_for_build_locks(patience_s=5, poll_s=0.1, root=str(tmp_path))


def test_a_loss_the_data_cannot_feed_fails_before_anything_starts(drafter_and_data, capsys):
    import pyarrow as pa

    from sd2_ray import storage
    from sd2_ray.testing.toy import with_toy_topk

    model, root = drafter_and_data
    plain = write_toy_dataset(f"{root}/plain", 16)  # distilled without logprobs_top_k
    out = f"{root}/out"
    for argv, field in (
        (["--loss", "fkl"], "field 'loss'"),
        (["select_by=expected_mal", "eval_every=2"], "field 'select_by'"),
    ):
        code, err = _cli(["--model", model, "--data", plain, "--output", out, *argv], capsys)
        assert code == 2 and field in err and "logprobs_top_k" in err and "\n" not in err, err
    topk = f"{root}/topk"
    storage.write_parquet(f"{topk}/part-0.parquet", pa.Table.from_pylist(with_toy_topk(toy_rows(16), toy_tokenizer())))
    code, err = _cli(
        ["--model", model, "--data", topk, "--output", out, "--loss", "tvd", "use_response_ids=false"], capsys
    )
    assert code == 2 and "field 'use_response_ids'" in err and "\n" not in err, err
    assert not storage.exists(out)  # no manifest, no skipped-rows file: nothing started
