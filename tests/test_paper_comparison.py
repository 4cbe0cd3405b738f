"""The report's paper comparison: each headline ratio beside SD²'s figure and whether its direction holds."""

import pytest

from sd2_ray.evaluate.paper import paper_comparison, paper_markdown


def drafter(name, mal, macs):
    return {"name": name, "mean_accepted_length": mal, "drafter_macs_per_token": macs}


def report_of(dense_sd, layer, sd2, sft, dense_macs=1000, sparse_macs=600, layer_macs=600):
    """A report as the pipeline builds it: each drafter's evaluated MAL and MACs, then the
    pipeline's own ``comparisons`` of them (nothing computed here)."""
    from sd2_ray.pipeline.report import comparisons, drafter_entries

    evaluated = {
        "dense-sd": (dense_sd, dense_macs),
        "layer-pruned-sd": (layer, layer_macs),
        "sd2": (sd2, sparse_macs),
        "sparse-sft": (sft, sparse_macs),
    }
    entries = drafter_entries(
        {name: {"mean_accepted_length": mal, "drafter_macs_per_token": macs} for name, (mal, macs) in evaluated.items()}
    )
    return {"drafters": entries, "comparisons": comparisons(entries)}


def by_ratio(rows):
    return {r["ratio"]: r for r in rows}


def test_ratios_are_computed_from_the_drafters_the_right_way_up():
    """SD² over its baseline, never the reverse: with MALs 2.8 (SD²) and 2.2 (layer-pruned) the
    ratio is 1.27 and holds; an inverted ratio (0.79) would fail both the value and the verdict,
    and swapping the drafters' MALs must flip the verdict."""
    rows = by_ratio(paper_comparison(report_of(dense_sd=3.0, layer=2.2, sd2=2.8, sft=1.9)))
    assert rows["sd2_mal_over_layer_pruned"]["ours"] == pytest.approx(2.8 / 2.2)
    assert rows["sd2_mal_over_sparse_sft"]["ours"] == pytest.approx(2.8 / 1.9)
    assert rows["sd2_macs_reduction_vs_dense_sd"]["ours"] == pytest.approx(1 - 600 / 1000)
    assert rows["sd2_mal_drop_vs_dense_sd"]["ours"] == pytest.approx(1 - 2.8 / 3.0)
    assert rows["layer_pruned_macs_over_sd2"]["ours"] == pytest.approx(1.0)
    assert all(r["holds"] for r in rows.values()), rows

    swapped = by_ratio(paper_comparison(report_of(dense_sd=3.0, layer=2.8, sd2=2.2, sft=2.9)))
    assert swapped["sd2_mal_over_layer_pruned"]["ours"] == pytest.approx(2.2 / 2.8)
    assert not swapped["sd2_mal_over_layer_pruned"]["holds"]
    assert not swapped["sd2_mal_over_sparse_sft"]["holds"]


@pytest.mark.parametrize("sd2, holds", [(2.6, True), (1.7, False)])
def test_mal_drop_holds_only_when_smaller_than_the_macs_saved(sd2, holds):
    """40 % MACs saved: losing 13 % of dense-sd's MAL holds, losing 43 % does not."""
    rows = by_ratio(paper_comparison(report_of(dense_sd=3.0, layer=1.5, sd2=sd2, sft=1.5)))
    assert rows["sd2_mal_drop_vs_dense_sd"]["ours"] == pytest.approx(1 - sd2 / 3.0)
    assert rows["sd2_mal_drop_vs_dense_sd"]["holds"] is holds


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
