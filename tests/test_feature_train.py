"""Training a feature head from streamed feature rows, without Ray: the extractor's rows, the
chain unrolling (each block equals drafting that chain step by step), training-time test, the
held-out chain acceptance against real decoding, and the target parts a worker loads alone."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.feature.config import FeatureHeadConfig
from sd2_ray.feature.decode import FeatureSpecDecoder, total_stats
from sd2_ray.feature.extract import ExtractSettings, extract_rows, load_target_parts
from sd2_ray.feature.head import FeatureHead
from sd2_ray.feature.train import FeatureHeadLoss, chain_acceptance, collate, unroll
from sd2_ray.specdec.types import GenerationRequest
from sd2_ray.testing.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class IdTokenizer:
    """Whitespace-separated ids as text: the rows carry their own ids (use_response_ids)."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def greedy(target, prompt: list[int], n: int) -> list[int]:
    """The target's greedy continuation, n tokens long whatever it says (no stop id)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, target(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def rows_for(target, count: int, seed: int = 0, answer: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        prompt = torch.randint(3, 90, (4 + i % 5,), generator=g).tolist()
        response = greedy(target, prompt, answer)
        rows.append({"id": f"r{i}", "prompt": " ".join(map(str, prompt)), "response_ids": response, "response": "x"})
    return rows


def new_head(target, variant="eagle", seed=1, **overrides):
    torch.manual_seed(seed)
    return FeatureHead(FeatureHeadConfig.for_target(target.config, variant, **overrides), target)


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return tiny_model("llama", seed=0)


def feature_rows(target, rows, layers=(-1,)):
    settings = ExtractSettings(layers=layers, seq_len=64)
    columns = extract_rows(target, IdTokenizer(), rows, settings)
    return [{name: values[i] for name, values in columns.items()} for i in range(len(rows))]


def test_extracted_rows_hold_the_target_pass(target):
    rows = rows_for(target, 3)
    out = feature_rows(target, rows)
    assert [r["row_id"] for r in out] == ["r0", "r1", "r2"] and "top" not in out[0]
    for row, feat in zip(rows, out, strict=True):
        prompt = [int(t) for t in row["prompt"].split()]
        assert list(feat["input_ids"]) == prompt + row["response_ids"]
        assert list(feat["loss_mask"]) == [0] * len(prompt) + [1] * len(row["response_ids"])
        # the target's argmax at each response position is the next greedy token
        assert list(feat["target_ids"][len(prompt) - 1 : -1]) == row["response_ids"]
        assert feat["features"].shape == (len(feat["input_ids"]), target.config.hidden_size)
    three = feature_rows(target, rows[:1], layers=(1, 2, -1))[0]
    assert three["features"].shape[1] == 3 * target.config.hidden_size and three["top"].shape[1] == 32


def test_unrolled_blocks_equal_a_chain_drafted_step_by_step(target):
    """Block t at column j = the head run over j + 1 target features then t of its own
    predictions (fed with the sequence's true tokens), as chain drafting computes it."""
    head = new_head(target, "fspad").eval()
    batch = collate(feature_rows(target, rows_for(target, 2, seed=4)))
    with torch.no_grad():
        outs = unroll(head, batch, 2)
        row, j = 1, 7
        features = head.reduce_features(batch["features"][row : row + 1, : j + 1])
        ids = batch["input_ids"][row : row + 1]
        for t in range(3):
            mask = torch.ones(1, features.shape[1], dtype=torch.bool)
            out = head(features, ids[:, 1 : features.shape[1] + 1], mask)
            torch.testing.assert_close(out.logits[0, -1], outs[t].logits[row, j], rtol=1e-4, atol=1e-4)
            features = torch.cat([features, out.regress_features[:, -1:]], dim=1)


def train(head, batch, steps, ttt=0, lr=1e-2):
    module = FeatureHeadLoss(head, token_weight=1.0, ttt_steps=ttt).train()
    opt = torch.optim.AdamW(head.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = module(**batch) / module.last["positions"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_heldout_chain_acceptance_predicts_decoding_mal(target):
    """The held-out estimate (1 + accepted / chains, greedy) tracks the MAL of real decoding on
    the same rows, and a trained head beats an untrained one on both."""
    rows = rows_for(target, 6, seed=3, answer=24)
    batch = collate(feature_rows(target, rows))
    head = new_head(target)
    before = chain_acceptance(head.eval(), batch, 3)
    losses = train(head, batch, 40)
    after = chain_acceptance(head.eval(), batch, 3)
    assert losses[-1] < losses[0] and after["accepted"] > before["accepted"]
    estimate = 1 + after["accepted"] / after["chains"]
    prompts = [[int(t) for t in r["prompt"].split()] for r in rows]
    results = FeatureSpecDecoder(target, head, 3, eos_token_ids=()).generate(
        [GenerationRequest(p, 24) for p in prompts]
    )
    measured = total_stats(results).mean_accepted_length
    print(f"estimate {estimate:.3f}, decoded MAL {measured:.3f}")
    assert estimate > 1.5 and abs(estimate - measured) / measured < 0.2


def test_training_time_test_trains_later_chain_steps(target):
    batch = collate(feature_rows(target, rows_for(target, 6, seed=5, answer=24)))
    plain, ttt = new_head(target), new_head(target)
    train(plain, batch, 30)
    train(ttt, batch, 30, ttt=2)
    a, b = chain_acceptance(plain.eval(), batch, 3), chain_acceptance(ttt.eval(), batch, 3)
    print(f"per position plain {a['per_position']}, ttt {b['per_position']}")
    assert b["per_position"][2] >= a["per_position"][2]


def test_target_parts_are_the_targets_embedding_and_lm_head(target, tmp_path):
    target.save_pretrained(tmp_path / "t")
    parts = load_target_parts(str(tmp_path / "t"))
    torch.testing.assert_close(parts.get_input_embeddings().weight, target.get_input_embeddings().weight)
    torch.testing.assert_close(parts.get_output_embeddings().weight, target.get_output_embeddings().weight)
    assert not parts.get_output_embeddings().weight.requires_grad


def test_a_heads_drafting_macs_count_its_layers_and_the_targets_lm_head(target):
    from sd2_ray.feature.evaluate import head_macs

    head = new_head(target, "fspad")
    report = head_macs(head)
    own = sum(p.numel() for name, p in head.named_parameters() if p.ndim == 2)  # every matrix is a linear here
    lm = target.config.hidden_size * target.config.vocab_size
    assert report["macs"] == report["dense_macs"] == own + lm and report["head_macs"] == lm
    hidden, heads = target.config.hidden_size, target.config.num_attention_heads
    assert report["attention_macs_per_context_token"] == 2 * heads * (hidden // heads)  # one layer
