"""The report's paper comparison: each headline ratio beside SD²'s figure and whether its direction holds."""

import pytest

from sd2_ray.evaluate.paper import paper_comparison, paper_markdown


def drafter(name, mal, macs):
    return {"name": name, "mean_accepted_length": mal, "drafter_macs_per_token": macs}


def report_of(dense_sd, layer, sd2, sft, dense_macs=1000, sparse_macs=600, layer_macs=600):
    drafters = [
        drafter("dense-sd", dense_sd, dense_macs),
        drafter("layer-pruned-sd", layer, layer_macs),
        drafter("sd2", sd2, sparse_macs),
        drafter("sparse-sft", sft, sparse_macs),
    ]
    comparisons = {
        "sd2_mal_over_layer_pruned": sd2 / layer,
        "sd2_macs_reduction_vs_dense_sd": 1 - sparse_macs / dense_macs,
        "sd2_mal_drop_vs_dense_sd": 1 - sd2 / dense_sd,
        "sd2_mal_over_sparse_sft": sd2 / sft,
    }
    return {"drafters": drafters, "comparisons": comparisons}


def by_ratio(rows):
    return {r["ratio"]: r for r in rows}


def test_paper_direction_holds_when_sd2_wins_at_equal_macs():
    rows = by_ratio(paper_comparison(report_of(dense_sd=3.0, layer=2.2, sd2=2.8, sft=1.9)))
    assert rows["sd2_mal_over_layer_pruned"]["ours"] == pytest.approx(2.8 / 2.2)
    assert rows["sd2_mal_over_layer_pruned"]["paper"] == 1.59
    assert rows["sd2_macs_reduction_vs_dense_sd"]["paper"] == 0.4387
    assert rows["sd2_mal_drop_vs_dense_sd"]["ours"] == pytest.approx(1 - 2.8 / 3.0)
    assert all(r["holds"] for r in rows.values()), rows
    assert rows["layer_pruned_macs_over_sd2"]["ours"] == pytest.approx(1.0)


def test_paper_direction_fails_when_layer_pruned_wins_or_mal_drops_more_than_macs():
    rows = by_ratio(paper_comparison(report_of(dense_sd=4.0, layer=3.0, sd2=2.0, sft=2.5)))
    assert not rows["sd2_mal_over_layer_pruned"]["holds"]
    assert not rows["sd2_mal_over_sparse_sft"]["holds"]
    assert not rows["sd2_mal_drop_vs_dense_sd"]["holds"]  # 50 % MAL lost for 40 % MACs saved
    assert rows["sd2_macs_reduction_vs_dense_sd"]["holds"]


def test_unequal_macs_are_flagged():
    rows = by_ratio(paper_comparison(report_of(3.0, 2.2, 2.8, 1.9, sparse_macs=600, layer_macs=680)))
    assert rows["layer_pruned_macs_over_sd2"]["ours"] == pytest.approx(680 / 600)
    assert not rows["layer_pruned_macs_over_sd2"]["holds"]


def test_markdown_shows_ours_and_the_papers_figures():
    text = paper_markdown(report_of(dense_sd=3.0, layer=2.2, sd2=2.8, sft=1.9))
    assert text.startswith("## Paper comparison")
    assert f"{2.8 / 2.2:.3f}x | 1.590x" in text and "43.87%" in text and "8.36%" in text
    assert "not stated" in text  # the paper gives no SD²-vs-SFT MAL figure
    assert text.count("| yes |") == 5


def test_runs_without_the_baselines_give_no_section():
    report = {
        "drafters": [drafter("dense", 1.5, 1000), drafter("sd2", 2.0, 600)],
        "comparisons": {"sd2_mal_over_dense_base": 2.0 / 1.5},
    }
    assert paper_comparison(report) == [] and paper_markdown(report) == ""
