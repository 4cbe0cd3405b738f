"""Pipeline pieces without Ray: config composition, layer-drop sizing, the report."""

import json
import os

import pytest

from sd2_ray.errors import ConfigError
from sd2_ray.kit import with_kit_paths
from sd2_ray.pipeline.chain import eval_config, finetune_config, layer_prune_config, prune_config, serve_config
from sd2_ray.pipeline.config import PipelineConfig
from sd2_ray.pipeline.report import comparisons, write_pipeline_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"prune.sparsty": 0.5}, "'prune.sparsty': unknown field"),
        ({"prune.sparsity": 1.5}, "'prune.sparsity': must be in (0, 1)"),
        ({"finetune.zero_stage": 4}, "finetune.zero_stage"),
        ({"distill.target": "x"}, "distill.target': unknown field"),
        ({"layer_prune.method": "wanda"}, "layer_prune.method': unknown field"),
        ({"prune.method": "layers"}, "method 'layers' is the layer baseline"),
        ({"drafters": ["uag"], "uag_drafter": None}, "drafters: 'uag' needs uag_drafter"),
        ({"drafters": ["dense", "bogus"]}, "field 'drafters.1'"),
        ({"num_speculative_tokens": 0}, "field 'num_speculative_tokens'"),
        ({"drafters": ["sd2", "sd2-kd"]}, "drafters: 'sd2-kd' needs distill.logprobs_top_k > 0"),
        ({"kd.epochs": 3, "distill.logprobs_top_k": 20}, "kd: ['epochs'] cannot differ from sd2's fine-tuning"),
        ({"kd.loss": "kl"}, "kd: field 'loss'"),
        ({"kd.select_by": "expected_mal"}, "kd: select_by expected_mal needs eval_every"),
    ],
)
def test_bad_sections_fail_at_load_in_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(None, {"output": str(tmp_path), **override})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tiny_yaml_validates_and_chains_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output is made absolute against the caller's directory
    cfg = PipelineConfig.load(os.path.join(ROOT, "jobs/configs/tiny.yaml"), {"output": "o"})
    assert cfg.output == str(tmp_path / "o")
    assert cfg.drafter_names == ["dense", "dense-sd", "layer-pruned-sd", "sd2", "sparse-sft", "uag"]
    ft = finetune_config(cfg, "sparse-sft")
    assert ft.response_field == "reference" and ft.epochs == cfg.finetune.epochs == 4
    assert ft.model == str(tmp_path / "o" / "pruned" / "sd2") and ft.output == str(tmp_path / "o/drafters/sparse-sft")
    assert finetune_config(cfg, "dense-sd").model == cfg.drafter == "kit:drafter"
    layers = layer_prune_config(cfg, drop_layers=3)
    assert (layers.method, layers.drop_layers) == ("layers", 3)
    # the layer baseline is calibrated on the same rows as the SD² drafter's pruning
    prune = prune_config(cfg)
    assert (layers.calibration, layers.num_samples, layers.seq_len, layers.seed) == (
        prune.calibration,
        prune.num_samples,
        prune.seq_len,
        prune.seed,
    )
    served = serve_config(cfg)
    assert served.drafter == str(tmp_path / "o/drafters/sd2") and served.num_speculative_tokens == 4
    ev = eval_config(cfg, "uag")
    assert ev.drafter == "kit:drafter-uag" and ev.output.endswith("eval/uag/report.json")


def test_sd2_kd_is_sd2_with_the_kd_loss_and_only_with_top_k_data(tmp_path):
    plain = PipelineConfig.load(None, {"output": str(tmp_path), "uag_drafter": None})
    assert "sd2-kd" not in plain.drafter_names
    cfg = PipelineConfig.load(
        None,
        {
            "output": str(tmp_path),
            "uag_drafter": None,
            "distill.logprobs_top_k": 20,
            "finetune.epochs": 3,
            "kd": {"loss": "tvd", "ce_weight": 0.5, "eval_every": 8, "select_by": "expected_mal"},
        },
    )
    assert cfg.drafter_names == ["dense", "dense-sd", "layer-pruned-sd", "sd2", "sd2-kd", "sparse-sft"]
    kd, sd2 = finetune_config(cfg, "sd2-kd"), finetune_config(cfg, "sd2")
    assert (kd.loss, kd.ce_weight, kd.eval_every, kd.select_by) == ("tvd", 0.5, 8, "expected_mal")
    assert (sd2.loss, sd2.eval_every) == ("ce", None)
    assert kd.model == sd2.model == str(tmp_path / "pruned" / "sd2") and kd.data == sd2.data
    assert kd.output == str(tmp_path / "drafters" / "sd2-kd") and kd.epochs == sd2.epochs == 3
    assert eval_config(cfg, "sd2-kd").drafter == kd.output


def test_sd2_kd_loss_and_temperature_follow_the_decoding_mode(tmp_path):
    """Unset, the kd loss suits how the pair is served (bench_kd: jsd + ce greedy, fkl + ce
    sampled) and the distributions are compared at the serving temperature."""
    base = {"output": str(tmp_path), "uag_drafter": None, "distill.logprobs_top_k": 20}
    greedy = finetune_config(PipelineConfig.load(None, base), "sd2-kd")
    sampled = finetune_config(PipelineConfig.load(None, {**base, "eval.temperature": 0.8}), "sd2-kd")
    chosen = finetune_config(
        PipelineConfig.load(
            None, {**base, "eval.temperature": 0.8, "kd": {"loss": "tvd"}, "finetune.kd_temperature": 1.0}
        ),
        "sd2-kd",
    )
    assert (greedy.loss, greedy.ce_weight, greedy.kd_temperature) == ("jsd", 1.0, 0.0)
    assert (sampled.loss, sampled.ce_weight, sampled.kd_temperature) == ("fkl", 1.0, 0.8)
    assert (chosen.loss, chosen.ce_weight, chosen.kd_temperature) == ("tvd", 0.0, 1.0)


def test_layer_baseline_inherits_the_prune_sections_placement(tmp_path):
    cfg = PipelineConfig.load(
        None, {"output": str(tmp_path), "prune.num_gpus": 1, "prune.device": "cuda", "layer_prune.num_gpus": 2}
    )
    layers = layer_prune_config(cfg, drop_layers=1)
    assert (layers.device, layers.num_gpus) == ("cuda", 2)


def test_uag_left_out_without_a_uag_drafter():
    cfg = PipelineConfig.load(None, {"output": "o", "uag_drafter": None})
    assert "uag" not in cfg.drafter_names


def test_unknown_kit_part_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("sd2_ray.kit.ensure_kit", lambda **kw: str(tmp_path))
    cfg = PipelineConfig.load(None, {"output": "o", "target": "kit:tagret"})
    with pytest.raises(ConfigError, match="field 'target': unknown kit part 'kit:tagret'"):
        with_kit_paths(cfg)


def test_layer_drop_matches_sparse_macs(tmp_path):
    import torch

    from sd2_ray.prune.layers import matching_layer_drop
    from sd2_ray.testing.tiny import tiny_model

    dense = tiny_model("llama", layers=4, vocab_size=64)
    dense.save_pretrained(tmp_path / "dense")
    sparse = tiny_model("llama", layers=4, vocab_size=64)
    with torch.no_grad():  # zero every weight of two blocks: MACs of a 2-block model
        for i in (0, 1):
            for p in sparse.model.layers[i].parameters():
                p.zero_()
    sparse.save_pretrained(tmp_path / "sparse")
    assert matching_layer_drop(str(tmp_path / "dense"), str(tmp_path / "sparse")) == 2

    import shutil

    from sd2_ray import manifest
    from sd2_ray.pipeline.chain import pruned_dir
    from sd2_ray.pipeline.run import Pipeline

    run = Pipeline(
        PipelineConfig.load(
            None,
            {
                "output": str(tmp_path / "run"),
                "target": "t",
                "drafter": str(tmp_path / "dense"),
                "uag_drafter": None,
                "train_prompts": "p",
                "eval_prompts": "e",
            },
        )
    )
    shutil.copytree(tmp_path / "sparse", pruned_dir(run.config, "sd2"))
    assert run.layer_drop() == 2  # sized from the MACs
    shutil.rmtree(pruned_dir(run.config, "sd2"))
    manifest.complete(pruned_dir(run.config, "layers"), "prune", dropped_blocks=[3])
    assert run.layer_drop() == 1  # a finished baseline keeps its count


def fake_report(mal, macs, name):
    return {
        "mean_accepted_length": mal,
        "acceptance_rate": (mal - 1) / 4,
        "per_position_acceptance": [0.5] * 4,
        "drafter_macs_per_token": macs,
        "drafter_dense_macs_per_token": 1000,
        "drafter_sparsity": 0.0,
        "cost_coefficient": macs / 10_000,
        "predicted_speedup": mal / (4 * macs / 10_000 + 1),
        "measured_speedup": 1.1,
        "tokens_per_second": 100.0,
        "lossless": True,
        "cross_tokenizer": False,
        "drafter": f"/d/{name}",
        "target": "/t",
        "num_prompts": 8,
        "target_macs_per_token": 10_000,
        "temperature": 0.0,
        "baseline_tokens_per_second": 90.0,
    }


def fake_categories(math_mal, qa_mal):
    return {
        "math": {"prompts": 3, "mean_accepted_length": math_mal, "acceptance_rate": 0.4, "measured_speedup": 1.2},
        "qa": {"prompts": 5, "mean_accepted_length": qa_mal, "acceptance_rate": 0.3, "measured_speedup": 0.9},
    }


def test_report_rows_and_headline_ratios(tmp_path):
    reports = {
        "dense-sd": {**fake_report(2.0, 1000, "dense-sd"), "categories": fake_categories(2.5, 1.7)},
        "layer-pruned-sd": {**fake_report(1.25, 600, "lp"), "categories": fake_categories(1.5, 1.1)},
        "sd2": {**fake_report(1.8, 600, "sd2"), "categories": fake_categories(2.25, 1.55)},
    }
    cfg = PipelineConfig.load(None, {"output": str(tmp_path)})
    summary = write_pipeline_report(cfg, reports, str(tmp_path / "report"))
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [d["name"] for d in saved["drafters"]] == ["dense-sd", "layer-pruned-sd", "sd2"]
    ratios = comparisons(saved["drafters"])
    assert ratios["sd2_mal_over_layer_pruned"] == pytest.approx(1.8 / 1.25)
    assert ratios["sd2_macs_reduction_vs_dense_sd"] == pytest.approx(0.4)
    assert ratios["sd2_mal_drop_vs_dense_sd"] == pytest.approx(0.1)
    assert "| sd2 | 1.800 |" in summary["table"]
    assert saved["drafters"][2]["categories"] == fake_categories(2.25, 1.55)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| drafter | math (3) | qa (5) |" in md and "| sd2 | 2.250 | 1.550 |" in md
    for png in ("mal_vs_macs.png", "acceptance_by_position.png", "mal_by_category.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_says_which_loss_and_data_each_fine_tuned_drafter_used(tmp_path):
    from sd2_ray import storage
    from sd2_ray.pipeline.chain import drafter_dir

    cfg = PipelineConfig.load(
        None,
        {
            "output": str(tmp_path),
            "distill.logprobs_top_k": 20,
            "kd": {"loss": "fkl", "ce_weight": 1.0, "eval_every": 4, "select_by": "expected_mal"},
        },
    )
    storage.write_json(
        os.path.join(drafter_dir(cfg, "sd2-kd"), "metrics.json"), {"steps_done": 48, "published_step": 40}
    )
    reports = {
        "sd2": fake_report(2.0, 600, "sd2"),
        "sd2-kd": fake_report(2.2, 600, "sd2-kd"),
        "dense": fake_report(1.2, 1000, "dense"),
    }
    write_pipeline_report(cfg, reports, str(tmp_path / "report"))
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    by = {d["name"]: d for d in saved["drafters"]}
    assert "training" not in by["dense"]
    kd = by["sd2-kd"]["training"]
    assert (kd["loss"], kd["ce_weight"], kd["distill_mode"], kd["logprobs_top_k"]) == ("fkl", 1.0, "generate", 20)
    assert (kd["select_by"], kd["published_step"], kd["steps"]) == ("expected_mal", 40, 48)
    assert by["sd2"]["training"]["loss"] == "ce" and by["sd2"]["training"]["data"] == kd["data"]
    assert saved["comparisons"]["sd2_kd_mal_over_sd2"] == pytest.approx(1.1)
    md = (tmp_path / "report" / "report.md").read_text()
    assert by["sd2"]["categories"] == {} and "by task category" not in md  # no categories: no table, no plot
    assert not (tmp_path / "report" / "mal_by_category.png").exists()
    assert (
        "loss fkl + 1·ce on generate data with the target's top-20 log-probs; published step 40 of 48, "
        "chosen by held-out expected_mal"
    ) in md


def test_single_stage_from_pipeline_yaml_chains_like_the_pipeline(tmp_path):
    from sd2_ray import cli

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        f"output: {tmp_path}/run\ntarget: /m/t\ndrafter: /m/d\ntrain_prompts: /p/train.jsonl\n"
        "eval_prompts: /p/eval.jsonl\nprune: {sparsity: 0.6}\nfinetune: {lr: 0.001}\n"
    )
    args = cli.build_parser().parse_args(["prune", "--config", str(cfg_file), "--num-samples", "8"])
    prune = cli.load_config("prune", args)
    assert (prune.model, prune.calibration, prune.sparsity, prune.num_samples) == (
        "/m/d",
        f"{tmp_path}/run/distilled",
        0.6,
        8,
    )
    args = cli.build_parser().parse_args(["prune", "--config", str(cfg_file), "output=rel/out"])
    assert cli.load_config("prune", args).output == os.path.abspath("rel/out")
    assert prune.output == f"{tmp_path}/run/pruned/sd2"
    args = cli.build_parser().parse_args(["finetune", "--config", str(cfg_file)])
    finetune = cli.load_config("finetune", args)
    assert (finetune.model, finetune.lr) == (prune.output, 0.001)


def test_feature_heads_are_opt_in_heads_of_the_target_with_one_budget(tmp_path):
    """eagle and fspad: not in the default list; when asked for, a fine-tune of the *target* with
    the feature_head section (the drafter's name as the variant), the finetune section's budget
    and feature_finetune's changes, the same for both; a bad change is named."""
    base = {"output": str(tmp_path), "uag_drafter": None}
    assert not {"eagle", "fspad"} & set(PipelineConfig.load(None, base).drafter_names)
    cfg = PipelineConfig.load(
        None,
        {
            **base,
            "drafters": ["sd2", "eagle", "fspad"],
            "finetune.epochs": 3,
            "feature_head": {"ttt_steps": 2, "stream": {"actors": 2}},
            "feature_finetune": {"lr": 3e-3},
        },
    )
    eagle, fspad, sd2 = (finetune_config(cfg, name) for name in ("eagle", "fspad", "sd2"))
    assert eagle.model == fspad.model == cfg.target and sd2.feature_head is None
    assert (eagle.feature_head.variant, fspad.feature_head.variant) == ("eagle", "fspad")
    assert eagle.feature_head.ttt_steps == 2 and fspad.feature_head.stream.actors == 2
    assert eagle.lr == fspad.lr == 3e-3 and sd2.lr != 3e-3
    assert eagle.epochs == fspad.epochs == sd2.epochs == 3
    assert eagle.output.endswith("drafters/eagle")
    bad = PipelineConfig.load(None, {**base, "drafters": ["eagle"], "feature_finetune": {"loss": "fkl"}})
    with pytest.raises(ConfigError, match="loss"):
        finetune_config(bad, "eagle")
