"""``sd2 eval`` end to end on tiny pairs: report fields, files, resume, S3, baseline reuse."""

from __future__ import annotations

import json
import logging
import os

import pytest

from sd2_ray import manifest, storage
from sd2_ray.cli import main as cli
from sd2_ray.errors import DataError
from sd2_ray.evaluate import evaluate_pair, measure_target_only, prepare_prompts
from sd2_ray.evaluate.config import EvalSettings
from sd2_ray.models.io import load_model, load_tokenizer
from sd2_ray.testing.engine_pairs import tiny_pair_dirs

REQUIRED = [
    "mean_accepted_length",
    "acceptance_rate",
    "per_position_acceptance",
    "num_speculative_tokens",
    "target_macs_per_token",
    "drafter_macs_per_token",
    "cost_coefficient",
    "predicted_speedup",
    "measured_speedup",
    "tokens_per_second",
    "lossless",
]
ROWS = [
    {"id": "a", "prompt": "the cat sat on"},
    {"id": "b", "messages": [{"role": "user", "content": "hello"}]},
    {"prompt": "An answer: 4"},
    {"id": "d", "prompt": "x"},
    {"id": "e", "prompt": "why the sky"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    same = tiny_pair_dirs(str(root / "same"))
    cross = tiny_pair_dirs(str(root / "cross"), drafter_arch="gpt_neox", cross_tokenizer=True)
    return {"same": same, "cross": cross}


def write_prompts(path, rows=ROWS):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def check_report(report, k):
    for key in REQUIRED:
        assert key in report, key
    assert 1.0 <= report["mean_accepted_length"] <= k + 1
    assert len(report["per_position_acceptance"]) == k
    assert report["num_speculative_tokens"] == k and report["lossless"] is True
    assert report["predicted_speedup"] == pytest.approx(
        report["mean_accepted_length"] / (k * report["cost_coefficient"] + 1)
    )
    assert 0 < report["cost_coefficient"] < 1 and report["measured_speedup"] > 0
    assert report["measured_speedup_cpu"] > 0


def check_categories(report, prompts_per_category):
    """Per-category figures: the prompts split as asked, each category's numbers computed as the
    overall ones are (pooled back, they give the overall MAL and token count)."""
    cats = report["categories"]
    assert {name: c["prompts"] for name, c in cats.items()} == prompts_per_category
    passes = sum(c["target_passes"] for c in cats.values())
    committed = sum(c["mean_accepted_length"] * c["target_passes"] for c in cats.values())
    assert passes == report["target_passes"] and committed / passes == pytest.approx(report["mean_accepted_length"])
    assert sum(c["generated_tokens"] for c in cats.values()) == report["generated_tokens"]
    k = report["num_speculative_tokens"]
    for c in cats.values():
        assert c["predicted_speedup"] == pytest.approx(c["mean_accepted_length"] / (k * report["cost_coefficient"] + 1))
        assert c["acceptance_rate"] == pytest.approx(c["num_accepted_tokens"] / c["num_draft_tokens"])
        assert len(c["per_position_acceptance"]) == k and c["lossless"] is True
        assert c["measured_speedup"] > 0 and c["measured_speedup_cpu"] > 0
        interval = c["mal_ci95"]  # None for a category of one prompt: no spread to measure
        assert (interval is None) == (c["prompts"] < 2)
        assert interval is None or interval[0] <= c["mean_accepted_length"] <= interval[1]
    low, high = report["mal_ci95"]
    assert low <= report["mean_accepted_length"] <= high
    assert sum(c["seconds"] for c in cats.values()) == pytest.approx(report["seconds"])


@pytest.mark.parametrize("kind", ["same", "cross"])
def test_cli_writes_report_locally_and_skips_when_complete(pairs, tmp_path, kind, capsys):
    target, drafter = pairs[kind]
    out = tmp_path / "out" / "report.json"
    args = [
        "eval",
        "--target",
        target,
        "--drafter",
        drafter,
        "--prompts",
        write_prompts(tmp_path / "p.jsonl"),
        "--num-speculative-tokens",
        "3",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
        "--output",
        str(out),
    ]
    assert cli(args) == 0
    report = json.loads(out.read_text())
    check_report(report, 3)
    assert report["cross_tokenizer"] is (kind == "cross") and report["num_prompts"] == len(ROWS)
    folder = out.parent
    for name in ("report.md", "acceptance_by_position.png", "config.yaml", "manifest.json"):
        assert (folder / name).is_file(), name
    assert (folder / "acceptance_by_position.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean accepted length" in (folder / "report.md").read_text()
    assert manifest.is_complete(str(folder))
    stamp = out.stat().st_mtime_ns
    assert cli(args) == 0 and out.stat().st_mtime_ns == stamp  # complete: skipped


def test_cli_to_s3_with_sampling(pairs, tmp_path, s3_bucket):
    target, drafter = pairs["same"]
    prompts = f"s3://{s3_bucket}/prompts/p.jsonl"
    storage.write_text(prompts, "".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    out = f"s3://{s3_bucket}/runs/eval1"
    assert (
        cli(
            [
                "eval",
                "--target",
                target,
                "--drafter",
                drafter,
                "--prompts",
                prompts,
                "--num-speculative-tokens",
                "2",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.8",
                "--output",
                out,
            ]
        )
        == 0
    )
    report = storage.read_json(f"{out}/report.json")
    assert report["lossless"] is None and report["temperature"] == 0.8
    assert 1.0 <= report["mean_accepted_length"] <= 3 and report["measured_speedup"] > 0
    assert storage.exists(f"{out}/acceptance_by_position.png") and manifest.is_complete(out)


def test_bad_rows_are_skipped_and_listed_and_none_left_is_one_line_error(pairs, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="sd2_ray.evaluate")
    target, drafter = pairs["same"]
    prompts = tmp_path / "bad.jsonl"
    long_prompt = {"id": "long", "prompt": "word " * 400}  # past the tiny target's 256 positions
    prompts.write_bytes(
        b"\n".join(
            [
                json.dumps({**ROWS[0], "category": "chat"}).encode(),
                json.dumps(ROWS[1]).encode(),  # no category: "uncategorized" beside the others
                json.dumps({**ROWS[4], "category": "math"}).encode(),
                json.dumps({"id": "a", "prompt": "a second row with id a", "category": "math"}).encode(),
                json.dumps({"id": "zz", "prompt": ""}).encode(),
                b"{not json",
                b"\xff\xfe bytes",
                json.dumps(long_prompt).encode(),
            ]
        )
        + b"\n"
    )
    out = tmp_path / "o"
    code = cli(
        [
            "eval",
            "--target",
            target,
            "--drafter",
            drafter,
            "--prompts",
            str(prompts),
            "--output",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["num_prompts"] == 3 and report["lossless"] is True
    assert report["prompt_ids"].count("a") == 1  # the id is the key: its second row is not evaluated
    skipped = [json.loads(line) for line in (out / "_skipped.jsonl").read_text().splitlines()]
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 5 and "invalid JSON" in reasons and "not UTF-8" in reasons
    assert "'prompt' must be a non-empty string" in reasons and "context window" in reasons
    assert {"index": 3, "id": "a", "reason": "duplicate id"} in skipped
    check_categories(report, {"chat": 1, "math": 1, "uncategorized": 1})
    assert "| math | 1 |" in (out / "report.md").read_text() and "MAL 95 % interval" in (out / "report.md").read_text()
    assert any(r.getMessage().startswith("  math: MAL ") for r in caplog.records)

    prompts.write_text(json.dumps({"id": "zz", "prompt": ""}) + "\n")
    code = cli(
        ["eval", "--target", target, "--drafter", drafter, "--prompts", str(prompts), "--output", str(tmp_path / "o2")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no usable rows (1 skipped; e.g. row 1 (id 'zz'): 'prompt' must be a non-empty" in err
    assert err.strip().count("\n") == 0
    assert manifest.read(str(tmp_path / "o2"))["status"] == "failed"


def test_evaluate_pair_reuses_one_baseline(pairs):
    target_dir, drafter_dir = pairs["same"]
    target, tok = load_model(target_dir), load_tokenizer(target_dir)
    settings = EvalSettings(max_new_tokens=10)
    baseline = measure_target_only(target, prepare_prompts(ROWS, tok), settings, progress=False)
    reports = [
        evaluate_pair(target, drafter_dir, ROWS, k, settings, target_tokenizer=tok, baseline=baseline, progress=False)
        for k in (1, 3)
    ]
    for k, report in zip((1, 3), reports, strict=True):
        assert report["lossless"] is True and report["baseline_tokens_per_second"] == baseline["tokens_per_second"]
        assert report["categories"] == {}  # no row names a category
        assert len(report["per_position_acceptance"]) == k
    skipped = evaluate_pair(
        target,
        drafter_dir,
        ROWS,
        2,
        EvalSettings(max_new_tokens=10, measure_baseline=False),
        target_tokenizer=tok,
        progress=False,
    )
    assert skipped["measured_speedup"] is None and skipped["lossless"] is None
    with pytest.raises(DataError, match="baseline has 5 prompts"):
        evaluate_pair(
            target, drafter_dir, ROWS[:2], 2, settings, target_tokenizer=tok, baseline=baseline, progress=False
        )
    assert os.path.isdir(target_dir)
