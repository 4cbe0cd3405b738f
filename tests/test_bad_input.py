"""Bad input, as users give it: every command answers with one line naming the field, file, row
or URL, exits 2, loses nothing, and never hangs; bad rows are counted and skipped (listed in
``_skipped.jsonl``) and only a run left with no usable row fails.

The serving cases (a seed past 64 bits is a 400; one failing request fails alone, not its batch)
are in tests/test_serve_unit.py; a rerun after ``kill -9`` of the driver (no hang, no leftover
cluster joined) is the README test in tests/test_user_paths.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from sd2_ray import manifest
from sd2_ray.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny chat target + drafter, and a copy of the target whose weights file is cut short."""
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    root = tmp_path_factory.mktemp("models")
    target, drafter = save_tiny_pair(str(root))
    broken = str(root / "broken")
    shutil.copytree(target, broken)
    weights = os.path.join(broken, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    return {"target": target, "drafter": drafter, "broken": broken}


def run(argv, capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1] if code else ""


def prompts_file(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


GOOD = json.dumps({"id": "ok", "prompt": "the quick brown fox"}).encode()


@pytest.mark.parametrize("command", ["eval", "prune", "finetune", "distill", "serve"])
def test_damaged_weights_are_one_line_in_every_command(models, tmp_path, capsys, command):
    prompts = prompts_file(tmp_path / "p.jsonl", [GOOD] * 16)
    args = {
        "eval": ["--target", models["broken"], "--drafter", models["drafter"], "--prompts", prompts],
        "prune": ["--model", models["broken"], "--method", "magnitude", "--sparsity", "0.5"],
        "finetune": ["--model", models["broken"], "--data", prompts],
        "distill": ["--target", models["broken"], "--prompts", prompts],
        "serve": ["--target", models["broken"], "--port", "1"],
    }[command]
    output = [] if command == "serve" else ["--output", str(tmp_path / "out")]
    code = cli([command, *args, *output])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "broken" in err and ("truncated" in err or "cannot load the model" in err), err


def test_eval_skips_bad_and_overlong_rows_and_lists_them(models, tmp_path, capsys):
    """Non-UTF-8 bytes, broken JSON, an empty prompt and a prompt past the context window are
    skipped with their reasons; the report is for the usable rows (and still lossless)."""
    long_prompt = json.dumps({"id": "long", "prompt": "word " * 400}).encode()
    prompts = prompts_file(
        tmp_path / "p.jsonl",
        [GOOD, b"\xff\xfe bytes", b"{not json", json.dumps({"id": "e", "prompt": ""}).encode(), long_prompt],
    )
    out = tmp_path / "out"
    code = cli(
        [
            "eval",
            "--target",
            models["target"],
            "--drafter",
            models["drafter"],
            "--prompts",
            prompts,
            "--output",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0, capsys.readouterr().err
    skipped = [json.loads(line) for line in (out / "_skipped.jsonl").read_text().splitlines()]
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 4 and "not UTF-8" in reasons and "invalid JSON" in reasons
    assert "context window" in reasons and "'prompt' must be a non-empty string" in reasons
    report = json.loads((out / "report.json").read_text())
    assert report["num_prompts"] == 1 and report["lossless"] is True


@pytest.mark.parametrize("command", ["eval", "distill"])
def test_no_usable_row_fails_with_one_line_and_writes_no_complete_output(models, tmp_path, capsys, command):
    prompts = prompts_file(tmp_path / "p.jsonl", [b"\xff oops", json.dumps({"prompt": 3}).encode()])
    args = ["--prompts", prompts, "--output", str(tmp_path / "out"), "--target", models["target"]]
    if command == "eval":
        args += ["--drafter", models["drafter"]]
    code, last = run([command, *args], capsys)
    assert code == 2 and "no usable rows (2 skipped; e.g. line 1: not UTF-8" in last
    assert not manifest.is_complete(str(tmp_path / "out"))


def test_finetune_skips_a_bad_row_instead_of_rejecting_the_data(tmp_path):
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.inputs import prepare_data
    from sd2_ray.testing.toy import make_sparse_drafter, toy_rows

    rows = toy_rows(16)
    rows[5]["response"] = None
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    config = FinetuneConfig(
        model=make_sparse_drafter(str(tmp_path / "m"), 0.5), data=str(data), output=str(tmp_path / "out"), workers=1
    )
    data = prepare_data(config)
    assert data.rows == 15 and data.files[0].endswith("_data/train.parquet")  # staged: what every worker reads
    skipped = [json.loads(line) for line in (tmp_path / "out" / "_skipped.jsonl").read_text().splitlines()]
    assert [s.get("line") or s.get("row") for s in skipped] == [17, 6]
    with pytest.raises(Exception, match="only 15 of 17 rows are usable"):
        prepare_data(config.model_copy(update={"min_usable_share": 0.95}))


def test_unreachable_s3_is_one_line_in_bounded_time(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("SD2_S3_TIMEOUT_S", "3")
    began = time.monotonic()
    code, last = run(
        [
            "eval",
            "--target",
            models["target"],
            "--drafter",
            models["drafter"],
            "--prompts",
            "s3://bucket/prompts.jsonl",
            "--output",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 2 and "s3://bucket/prompts.jsonl" in last and "http://127.0.0.1:9" in last
    assert time.monotonic() - began < 60


def test_non_utf8_config_file_names_the_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"target: t\nprompts: \xff\n")
    code, last = run(["eval", "--config", str(config)], capsys)
    assert code == 2 and "c.yaml: line 2: not UTF-8" in last


def test_relative_paths_are_made_absolute_where_the_command_is_typed(tmp_path, monkeypatch):
    """`sd2 finetune --model relative/dir` used to be resolved by each Ray Train worker in its own
    directory (and fail after 3 retries)."""
    from sd2_ray import cli as cli_module

    monkeypatch.chdir(tmp_path)
    args = cli_module.build_parser().parse_args(
        ["finetune", "--model", "pruned/sd2", "--data", "d.jsonl", "--output", "out/x"]
    )
    config = cli_module.load_config("finetune", args)
    assert (config.model, config.data, config.output) == (
        str(tmp_path / "pruned/sd2"),
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "out/x"),
    )


def test_api_key_from_a_file_or_the_environment_not_the_command_line(tmp_path, monkeypatch):
    from sd2_ray.serve.config import API_KEY_ENV, ServeConfig

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert ServeConfig(target="t", api_key_file=str(key_file)).effective_api_key() == "s3cret"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeConfig(target="t").effective_api_key() == "from-env"
    key_file.write_text("\n")
    with pytest.raises(Exception, match="api_key_file"):
        ServeConfig(target="t", api_key_file=str(key_file)).effective_api_key()
