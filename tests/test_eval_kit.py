"""Eval on the model kit (trained pair): lossless with the same and with another tokenizer."""

from __future__ import annotations

import pytest

from sd2_ray.evaluate import evaluate_pair
from sd2_ray.evaluate.config import EvalSettings
from sd2_ray.kit import kit_paths
from sd2_ray.models.io import load_model
from sd2_ray.models.macs import linear_macs
from sd2_ray.rows import read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "drafter,batch,prompts,tokens,k",
    [("drafter", 4, 4, 24, 3), ("drafter-uag", 4, 4, 24, 3), ("drafter-uag", 1, 8, 48, 4)],
)
def test_kit_pair_is_lossless(kit_dir, drafter, batch, prompts, tokens, k):
    """Batch 1 with the UAG drafter once crashed: its cache could cover all committed text,
    leaving nothing to feed for the next draft's logits."""
    paths = kit_paths(kit_dir)
    rows = read_rows(paths["eval_prompts"], limit=prompts)
    report = evaluate_pair(
        paths["target"], paths[drafter], rows, k, EvalSettings(max_new_tokens=tokens, batch_size=batch), progress=False
    )
    print(
        f"{drafter}: MAL {report['mean_accepted_length']:.3f}, per position "
        f"{report['per_position_acceptance']}, c {report['cost_coefficient']:.3f}"
    )
    assert report["lossless"] is True and report["cross_tokenizer"] is (drafter == "drafter-uag")
    assert 1.0 <= report["mean_accepted_length"] <= k + 1
    expected_c = linear_macs(load_model(paths[drafter]))["macs"] / linear_macs(load_model(paths["target"]))["macs"]
    assert report["cost_coefficient"] == pytest.approx(expected_c)
    assert 0 < report["target_passes"] <= report["generated_tokens"]
