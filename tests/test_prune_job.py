"""``sd2 prune`` end to end on tiny models: outputs, reruns, S3, a Ray task, one-line errors."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest
import torch

from sd2_ray import cli, manifest, storage
from sd2_ray.models.sparsity import check_nm, load_masks, masked_weights_nonzero, read_report
from sd2_ray.prune.verify import verify_pruned
from sd2_ray.testing.calibration import calibration_rows, save_tiny, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("m") / "tiny"), layers=3)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("d") / "cal.jsonl"), calibration_rows(10))


def run(args, capsys):
    """(exit code, the last stderr line: the CLI's one-line error; progress bars come before)."""
    code = cli.main(["prune", *args])
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return code, (lines[-1] + "\n") if lines else ""


def test_cli_sparsegpt_output_is_a_verified_sparse_model_dir(model_dir, prompts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "out")
    code, err = run(
        [
            "--model",
            model_dir,
            "--calibration",
            prompts,
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.6",
            "--num-samples",
            "8",
            "--seq-len",
            "64",
            "--output",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "masks/masks.safetensors",
        "sparsity.json",
        "config.yaml",
        "manifest.json",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    state = manifest.read(out)
    assert state["status"] == "complete" and state["executor"] == "local"
    report = verify_pruned(out)
    assert report["method"] == "sparsegpt" and report["total_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report["calibration"]["num_samples"] == 8 and report["calibration"]["seq_len"] == 64
    assert len(report["layers"]) == 3 * 7
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out)
    assert masked_weights_nonzero(model, masks) == 0
    assert AutoTokenizer.from_pretrained(out).vocab_size == 96
    # A tampered weight is caught by the verify function.
    key = next(iter(masks))
    with torch.no_grad():
        dict(model.named_parameters())[key][~masks[key]] = 1.0
    from sd2_ray.errors import DataError

    with pytest.raises(DataError, match="nonzero where the mask says pruned"):
        verify_pruned(out, model=model)
    # A rerun of a complete output is skipped (the files stay as they were).
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    code, _ = run(["--model", model_dir, "--calibration", prompts, "--sparsity", "0.6", "--output", out], capsys)
    assert code == 0 and os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp


def test_cli_wanda_2_4_from_a_distilled_parquet_dir(model_dir, tmp_path, capsys):
    data = tmp_path / "distilled"
    data.mkdir()
    rows = [
        {"id": r["id"], "messages": r["messages"], "prompt": None, "response": r["response"], "error": None}
        for r in calibration_rows(6, seed=1)
    ]
    rows.append({"id": "bad", "messages": rows[0]["messages"], "prompt": None, "response": None, "error": "boom"})
    storage.write_parquet(str(data / "shard-00000.parquet"), pa.Table.from_pylist(rows))
    manifest.complete(str(data), "distill")
    out = str(tmp_path / "out")
    code, err = run(
        ["--model", model_dir, "--calibration", str(data), "--method", "wanda", "--pattern", "2:4", "--output", out],
        capsys,
    )
    assert code == 0, err
    report = read_report(out)
    assert report["pattern"] == "2:4" and report["calibration"]["num_samples"] == 6
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    assert all(check_nm(params[k], 2, 4) for k in load_masks(out))


def test_unfinished_distilled_data_is_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "distilled"
    data.mkdir()
    storage.write_parquet(str(data / "shard-00000.parquet"), pa.Table.from_pylist(calibration_rows(2)))
    manifest.start(str(data), "distill")
    code, err = run(["--model", model_dir, "--calibration", str(data), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "not complete" in err and err.count("\n") == 1


def test_cli_layers_method_writes_a_smaller_model(model_dir, prompts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "layers")
    code, err = run(
        ["--model", model_dir, "--calibration", prompts, "--method", "layers", "--drop-layers", "1", "--output", out],
        capsys,
    )
    assert code == 0, err
    report = json.loads(open(os.path.join(out, "layer_pruning.json")).read())
    assert len(report["distances"]) == 3 and len(report["dropped_blocks"]) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert not os.path.exists(os.path.join(out, "masks"))


def test_magnitude_needs_no_calibration_and_writes_to_s3(model_dir, s3_bucket, tmp_path, capsys):
    out = f"s3://{s3_bucket}/runs/pruned"
    code, err = run(["--model", model_dir, "--method", "magnitude", "--sparsity", "0.75", "--output", out], capsys)
    assert code == 0, err
    assert manifest.is_complete(out)
    assert storage.is_file(f"{out}/masks/masks.safetensors") and storage.is_file(f"{out}/config.yaml")
    report = verify_pruned(out)
    assert report["total_sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_unfinished_output_is_redone_and_foreign_dir_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("left over")
    manifest.start(str(out), "prune")
    code, err = run(["--model", model_dir, "--method", "magnitude", "--output", str(out)], capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and manifest.is_complete(str(out))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run(["--model", model_dir, "--method", "magnitude", "--output", str(foreign)], capsys)
    assert code == 2 and "not an sd2 prune output" in err and (foreign / "notes.txt").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "0"], "sparsity"),
        (["--pattern", "4:2"], "pattern"),
        (["--pattern", "2-4"], "pattern"),
        (["--sparsity", "0.7", "--pattern", "2:4"], "contradicts"),
        (["--method", "sparsegpt", "--calibration", ""], "calibration"),
        (["--method", "layers"], "drop_layers"),
        (["--calibration", "MISSING"], "missing.jsonl: not found"),
        (["--model", "NOWEIGHTS"], "no safetensors"),
        (["--method", "bogus"], "method"),
    ],
)
def test_bad_input_is_one_line(args, needle, model_dir, prompts, tmp_path, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    base = {"--model": model_dir, "--calibration": prompts, "--output": str(tmp_path / "o")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    given = {
        k: (str(tmp_path / "missing.jsonl") if v == "MISSING" else str(empty) if v == "NOWEIGHTS" else v)
        for k, v in given.items()
    }
    flat = [x for k, v in {**base, **given}.items() for x in (k, v)]
    code, err = run(flat, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("sd2 prune:")
    assert needle in err


def test_runs_as_a_ray_task_inside_ray(model_dir, prompts, tmp_path, monkeypatch):
    import ray

    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import run_prune

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # A busy 2-core box (other suites running) can take long to register the raylet.
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "120")
    monkeypatch.setenv("RAY_agent_register_timeout_ms", "180000")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for attempt in range(2):  # Ray gives the raylet a fixed 30 s to register; retry once if overloaded
        try:
            ray.init(
                num_cpus=1,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
            )
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    try:
        out = run_prune(
            PruneConfig(
                model=model_dir,
                calibration=prompts,
                method="wanda",
                sparsity=0.5,
                num_samples=4,
                seq_len=32,
                output=str(tmp_path / "ray-out"),
            )
        )
        state = manifest.read(out)
        assert state["status"] == "complete" and state["executor"] == "ray_task"
        assert read_report(out)["total_sparsity"] == pytest.approx(0.5)
    finally:
        ray.shutdown()
