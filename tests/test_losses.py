"""Distillation losses against dense references on small vocabularies (pure torch, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.finetune import data as D
from sd2_ray.finetune.losses import LOSSES, LossSpec, loss_sum, target_log_probs

V = 11


def make_batch(k: int, seed: int = 0, batch: int = 3, length: int = 7, prompt: int = 2):
    """Target and drafter logits (B, L, V), labels with a prompt and right padding, and the
    target's top-k at temperature 1 aligned with the labels (position t+1 <- logits at t)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, length, V, generator=g, dtype=torch.float64) * 2.0
    drafter = torch.randn(batch, length, V, generator=g) * 2.0
    labels = torch.randint(0, V, (batch, length), generator=g)
    labels[:, :prompt] = D.IGNORE_INDEX
    labels[1, length - 2 :] = D.IGNORE_INDEX  # padding of a shorter row
    lp = torch.log_softmax(target, dim=-1)
    top = lp.topk(k, dim=-1)
    ids = torch.zeros(batch, length, k, dtype=torch.long)
    lps = torch.zeros(batch, length, k)
    ids[:, 1:], lps[:, 1:] = top.indices[:, :-1], top.values[:, :-1].float()  # label position t+1
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 1:] = labels[:, 1:] != D.IGNORE_INDEX
    return target, drafter, {"labels": labels, "topk_ids": ids, "topk_logprobs": lps, "topk_mask": mask}


def dense_divergence(kind: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook definitions in float64 on full (or lumped) distributions, last dim."""
    if kind == "fkl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "rkl":
        return (q * (q.log() - p.log())).sum(-1)
    if kind == "jsd":
        m = (p + q) / 2
        return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def labelled(labels):
    valid = labels[:, 1:] != D.IGNORE_INDEX
    return valid.nonzero(as_tuple=True)


def dense_reference(kind, target, drafter, batch, temperature, k=None):
    """Sum over labelled positions; ``k`` lumps every id outside the target's top-k into one
    bucket on both sides (the losses' support) at temperature 1."""
    b, t = labelled(batch["labels"])
    p = torch.softmax(target[b, t] / temperature, -1)
    q = torch.softmax(drafter[b, t].double() / temperature, -1)
    if k is not None:
        ids = batch["topk_ids"][b, t + 1]
        p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
        p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=1e-300)], -1)
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return dense_divergence(kind, p, q).sum()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0, 1.7])
def test_top_k_equals_the_exact_divergence_when_k_is_the_vocabulary(kind, temperature):
    target, drafter, batch = make_batch(k=V)
    got = loss_sum(drafter, batch, LossSpec(kind=kind, temperature=temperature)).total
    expected = dense_reference(kind, target, drafter, batch, temperature or 1.0)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected.item(), rel=2e-5, abs=2e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_top_k_with_a_rest_bucket_matches_the_lumped_dense_reference(kind):
    target, drafter, batch = make_batch(k=3, seed=1)
    got = loss_sum(drafter, batch, LossSpec(kind=kind, temperature=1.0)).total
    expected = dense_reference(kind, target, drafter, batch, 1.0, k=3)
    exact = dense_reference(kind, target, drafter, batch, 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    assert got.item() <= exact.item() + 1e-5  # lumping ids together never increases an f-divergence


def test_ce_equals_token_loss_sum_and_the_mix_adds_it():
    _, drafter, batch = make_batch(k=4, seed=2)
    ce = loss_sum(drafter, batch, LossSpec(kind="ce"))
    assert ce.total.item() == pytest.approx(D.token_loss_sum(drafter, batch["labels"]).item(), rel=1e-6)
    assert ce.ce_tokens == D.labelled_tokens(batch["labels"]) and ce.kd == 0.0
    pure = loss_sum(drafter, batch, LossSpec(kind="jsd"))
    mixed = loss_sum(drafter, batch, LossSpec(kind="jsd", ce_weight=0.3))
    assert mixed.total.item() == pytest.approx(pure.kd + 0.3 * ce.ce, rel=1e-5)
    assert pure.kd_tokens == ce.ce_tokens  # every labelled position of this batch has a top-k


@pytest.mark.parametrize("kind", LOSSES)
def test_gradients_flow_only_from_labelled_positions(kind):
    _, drafter, batch = make_batch(k=4, seed=3)
    logits = drafter.clone().requires_grad_(True)
    loss_sum(logits, batch, LossSpec(kind=kind, temperature=0.8, chunk_tokens=4)).total.backward()
    grad_rows = logits.grad.abs().sum(-1)  # (B, L): the logits at t carry the loss of label t+1
    carries = torch.zeros_like(grad_rows, dtype=torch.bool)
    carries[:, :-1] = batch["labels"][:, 1:] != D.IGNORE_INDEX
    assert bool((grad_rows[carries] > 0).all())
    assert bool((grad_rows[~carries] == 0).all())


@pytest.mark.parametrize("kind", ["ce", "fkl", "tvd"])
def test_masked_positions_carry_no_loss(kind):
    _, drafter, batch = make_batch(k=4, seed=4)
    before = loss_sum(drafter, batch, LossSpec(kind=kind)).total
    noisy = drafter.clone()
    carries = torch.zeros(drafter.shape[:2], dtype=torch.bool)
    carries[:, :-1] = batch["labels"][:, 1:] != D.IGNORE_INDEX
    noisy[~carries] += 100 * torch.randn_like(noisy[~carries])
    assert loss_sum(noisy, batch, LossSpec(kind=kind)).total.item() == pytest.approx(before.item(), rel=1e-6)


def test_chunking_changes_nothing():
    _, drafter, batch = make_batch(k=5, seed=5)
    results = []
    for chunk in (1, 3, 1000):
        logits = drafter.clone().requires_grad_(True)
        total = loss_sum(logits, batch, LossSpec(kind="rkl", ce_weight=0.5, chunk_tokens=chunk)).total
        total.backward()
        results.append((total.item(), logits.grad))
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-6)


def test_rows_without_top_k_add_no_divergence():
    _, drafter, batch = make_batch(k=4, seed=6)
    both = loss_sum(drafter, batch, LossSpec(kind="fkl"))
    batch["topk_mask"][1] = False
    one_less = loss_sum(drafter, batch, LossSpec(kind="fkl"))
    only_row = {key: value[1:2] for key, value in batch.items()}
    only_row["topk_mask"] = torch.ones_like(only_row["topk_mask"]) & (only_row["labels"] != D.IGNORE_INDEX)
    row1 = loss_sum(drafter[1:2], only_row, LossSpec(kind="fkl"))
    assert one_less.kd == pytest.approx(both.kd - row1.kd, rel=1e-5)
    assert one_less.kd_tokens == both.kd_tokens - row1.kd_tokens and one_less.ce == pytest.approx(both.ce)


def test_tempering_keeps_exact_ratios_on_the_top_k_and_bounds_the_rest():
    logits = torch.randn(4, V, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    top = torch.log_softmax(logits, -1).topk(4, dim=-1)
    for temperature in (0.5, 2.0):
        got = target_log_probs(top.values.float(), temperature).double()
        exact = torch.log_softmax(logits / temperature, -1).gather(-1, top.indices)
        # exact up to the normaliser: differences between top-k log-probs are exact
        assert torch.allclose(got[:, :4] - got[:, :1], exact - exact[:, :1], atol=1e-5)
        assert torch.allclose(got.exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-5)
    true_rest = 1 - torch.softmax(logits / 0.5, -1).gather(-1, top.indices).sum(-1)
    assert bool((target_log_probs(top.values.float(), 0.5)[:, -1].double().exp() >= true_rest - 1e-6).all())


def test_one_hot_target_with_full_support_stays_finite():
    _, drafter, batch = make_batch(k=V, seed=8)
    lps = torch.full_like(batch["topk_logprobs"], -1e9)
    lps[..., 0] = 0.0  # the target is certain
    batch["topk_logprobs"] = lps
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        logits = drafter.clone().requires_grad_(True)
        total = loss_sum(logits, batch, LossSpec(kind=kind)).total
        total.backward()
        assert torch.isfinite(total) and bool(torch.isfinite(logits.grad).all())


# ---------------------------------------------------------------- rows -> batches, config checks


def char_tok():
    from sd2_ray.testing.tokenizer import char_tokenizer

    return char_tokenizer()


def distilled_row(tok, prompt="ab", answer="cde", k=3, stop=True):
    ids = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])
    topk = [[t] + [(t + j) % 50 + 3 for j in range(1, k)] for t in ids]
    logprobs = [[-0.1 * (j + 1) - 0.01 * i for j in range(k)] for i in range(len(ids))]
    return {
        "id": "r",
        "prompt": prompt,
        "response": answer,
        "response_ids": ids,
        "topk_ids": topk,
        "topk_logprobs": logprobs,
    }


def test_rows_with_ids_train_on_them_with_aligned_top_k():
    tok = char_tok()
    row = distilled_row(tok, stop=False)  # a length-cut answer: no EOS is invented
    ex = D.encode_row(row, tok, seq_len=64, use_ids=True)
    prompt = tok("ab", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt + row["response_ids"] and ex.topk_start == len(prompt)
    assert ex.labels == [D.IGNORE_INDEX] * len(prompt) + row["response_ids"]
    assert ex.topk_ids.tolist() == row["topk_ids"]
    text = D.encode_row(row, tok, seq_len=64)  # default: the text path, EOS appended, no top-k
    assert text.topk_ids is None and text.input_ids[-1] == tok.eos_token_id
    cut = D.encode_row(distilled_row(tok, answer="cdefgh"), tok, seq_len=6, use_ids=True)
    assert len(cut.input_ids) == 6 and cut.topk_ids.shape[0] == 6 - cut.topk_start
    assert cut.topk_ids[:, 0].tolist() == cut.input_ids[cut.topk_start :]
    bad = {**row, "topk_ids": row["topk_ids"][:-1]}
    with pytest.raises(D.DataError, match="one list per response id"):
        D.encode_row(bad, tok, 64, use_ids=True)


def test_collate_pads_top_k_with_a_mask_and_rows_without_it_still_train_ce():
    tok = char_tok()
    plain = {"id": "p", "prompt": "xyz", "response": "hello"}
    rows = [distilled_row(tok), plain, {**distilled_row(tok, "q", "rs"), "response_ids": None}]
    batch = D.collate(D.encode_rows(rows, tok, 64, use_ids=True), tok.pad_token_id)
    mask = batch["topk_mask"]
    assert batch["topk_ids"].shape[:2] == batch["labels"].shape and batch["topk_ids"].shape[2] == 3
    assert mask[0].sum() == len(rows[0]["response_ids"]) and not mask[1:].any()
    assert bool((batch["topk_ids"][0][mask[0]][:, 0] == batch["labels"][0][mask[0]]).all())
    logits = torch.randn(*batch["labels"].shape, len(tok), requires_grad=True)
    kd = loss_sum(logits, batch, LossSpec(kind="tvd", ce_weight=1.0))
    assert kd.kd_tokens == len(rows[0]["response_ids"]) and kd.ce_tokens == D.labelled_tokens(batch["labels"])
    ce_only = D.collate(D.encode_rows([plain], tok, 64, use_ids=True), tok.pad_token_id)
    assert "topk_ids" not in ce_only
    assert loss_sum(logits[1:2, : ce_only["labels"].shape[1]], ce_only, LossSpec()).ce_tokens > 0


def finetune_config(**fields):
    from sd2_ray.finetune.config import FinetuneConfig

    return FinetuneConfig.load(overrides={"model": "M", "data": "D", "output": "O", **fields})


def test_check_loss_data_fails_with_one_line_naming_the_field():
    from sd2_ray.errors import ConfigError
    from sd2_ray.finetune.config import TOPK_COLUMNS, check_loss_data

    plain = ["id", "prompt", "response", "response_ids"]
    check_loss_data(finetune_config(), plain)  # ce needs nothing more
    check_loss_data(finetune_config(loss="fkl"), plain + list(TOPK_COLUMNS))
    cases = [
        (finetune_config(loss="fkl"), plain, "field 'loss'"),
        (finetune_config(loss="tvd", use_response_ids=False), plain + list(TOPK_COLUMNS), "field 'use_response_ids'"),
        (finetune_config(loss="jsd", response_field="reference"), plain + list(TOPK_COLUMNS), "field 'response_field'"),
        (finetune_config(select_by="expected_mal", eval_every=10), plain, "field 'select_by'"),
    ]
    for config, columns, field in cases:
        with pytest.raises(ConfigError, match=field) as err:
            check_loss_data(config, columns)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="eval_every"):
        finetune_config(select_by="expected_mal")
    with pytest.raises(ConfigError, match="field 'loss'"):
        finetune_config(loss="kl")
    spec = LossSpec.from_config(finetune_config(loss="rkl", ce_weight=0.2, kd_temperature=0.7))
    assert (spec.kind, spec.ce_weight, spec.compare_temperature, spec.needs_topk) == ("rkl", 0.2, 0.7, True)


# ---------------------------------------------------------------- hidden states + LM head (the training path)


@pytest.mark.parametrize("kind", LOSSES)
def test_hidden_states_and_head_equal_full_logits_in_value_gradient_and_acceptance(kind):
    """CausalLMLoss's path: logits made by the head at the labelled positions only, per chunk,
    under checkpointing, give the loss, gradients and acceptance that the full logits give."""
    from sd2_ray.finetune.acceptance import acceptance_sums
    from sd2_ray.finetune.loss_module import CausalLMLoss
    from sd2_ray.testing.tiny import tiny_model

    tok = char_tok()
    lm = tiny_model("llama", seed=3, vocab_size=len(tok)).train()
    rows = [distilled_row(tok, "ab", "cdefg", k=4), distilled_row(tok, "xyz", "hi", k=4, stop=False)]
    batch = D.collate(D.encode_rows(rows, tok, 64, use_ids=True), tok.pad_token_id)
    spec = LossSpec(kind=kind, ce_weight=0.5, temperature=0.7, chunk_tokens=3)
    reference = loss_sum(lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch, spec)
    reference.total.backward()
    expected = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    module = CausalLMLoss(lm, spec)
    assert module.chunked
    total = module(**batch, acceptance_k=3)
    total.backward()
    assert total.item() == pytest.approx(reference.total.item(), rel=1e-5)
    assert (module.last.ce_tokens, module.last.kd_tokens) == (reference.ce_tokens, reference.kd_tokens)
    for name, param in lm.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-3, atol=1e-5)  # fp32 sums in another order
    with torch.no_grad():
        full = acceptance_sums(lm(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch, 3, 0.7)
    assert module.last_acceptance == pytest.approx(full, rel=1e-5)
