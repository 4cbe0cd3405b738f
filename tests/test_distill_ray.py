"""Distillation end to end on local Ray with the model kit's trained target: actor pool, greedy
parity with a direct ``generate``, a real process kill + resume, S3 in and out, bad rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sd2_ray import manifest, storage
from sd2_ray.distill import core
from sd2_ray.distill.config import DistillConfig
from sd2_ray.distill.job import main

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_teardown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def kit_rows(kit_dir):
    from sd2_ray.kit import kit_paths
    from sd2_ray.rows import read_rows

    return read_rows(kit_paths(kit_dir)["train_prompts"])


@pytest.fixture(scope="module")
def target_dir(kit_dir):
    return os.path.join(kit_dir, "target")


def write_jsonl(path, rows) -> str:
    storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def output_ids(out: str) -> list[str]:
    return [r["id"] for r in core.read_distilled(out, include_failed=True)]


def direct_greedy(target_dir: str, rows: list[dict], max_new_tokens: int) -> list[str]:
    """What the target says for each row with a plain unbatched greedy ``model.generate``."""
    import torch

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import render_prompt

    model, tok = load_model(target_dir), load_tokenizer(target_dir)
    texts = []
    for row in rows:
        ids = tok(render_prompt(row, tok), add_special_tokens=False)["input_ids"]
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :]
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts


def test_kill_mid_run_then_resume_has_every_row_once(kit_rows, target_dir, tmp_path):
    rows = kit_rows[:16]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "sd2_ray.cli",
        "distill",
        "--target",
        target_dir,
        "--prompts",
        prompts,
        "--output",
        out,
        "--actors",
        "1",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--max-new-tokens",
        "32",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    first = os.path.join(out, core.record_file(0))
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver and the Ray it started
    proc.wait()
    log.close()
    assert os.path.exists(first), "first shard never completed: " + (tmp_path / "job.log").read_text()[-2000:]
    done_before = sorted(os.listdir(os.path.join(out, core.RECORDS_DIR)))
    assert manifest.read(out)["status"] == "running"
    assert len(done_before) < 4, "the kill came after the job had finished: nothing was interrupted"
    first_mtime = os.path.getmtime(os.path.join(out, core.shard_file(0)))

    config = DistillConfig(
        target=target_dir, prompts=prompts, output=out, actors=1, batch_size=2, shard_size=4, max_new_tokens=32
    )
    final = main(config)
    assert final["status"] == "complete" and final["totals"]["rows_out"] == 16
    ids = output_ids(out)
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(set(ids)) == len(ids) == 16
    assert os.path.getmtime(os.path.join(out, core.shard_file(0))) == first_mtime  # not redone
    assert len(final["shards"]) == 4 and all(s["rows_out"] == 4 for s in final["shards"])


def test_two_actors_every_id_once_and_greedy_equals_direct_generate(kit_rows, target_dir, tmp_path):
    rows = [{**row, "category": "math"} if i % 3 == 0 else row for i, row in enumerate(kit_rows[24:56])]
    repeat = {**kit_rows[60], "id": rows[5]["id"]}  # another row under an id already seen: skipped
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows + [repeat])
    out = str(tmp_path / "out")
    config = DistillConfig(
        target=target_dir, prompts=prompts, output=out, actors=2, batch_size=4, shard_size=8, max_new_tokens=32
    )
    final = main(config)
    assert final["status"] == "complete" and final["totals"]["rows_out"] == 32
    assert final["totals"]["failed"] == 0 and final["totals"]["skipped"] == 1 and final["totals"]["rows_in"] == 33
    skipped = [json.loads(line) for line in storage.read_text(f"{out}/{core.SKIPPED_FILE}").splitlines()]
    assert skipped == [{"index": 32, "shard": 4, "id": rows[5]["id"], "reason": "duplicate id"}]
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]  # once each, in input order
    assert [r["category"] for r in result] == [row.get("category") for row in rows]
    assert all(r["source"] == "target" and r["finish_reason"] in ("stop", "length") for r in result)
    assert all(r["reference"] == row["response"] for r, row in zip(result, rows, strict=True))
    picks = [0, 13, 31]
    assert [result[i]["response"] for i in picks] == direct_greedy(target_dir, [rows[i] for i in picks], 32)
    assert any(r["response"] != r["reference"] for r in result)  # the target's words, not the reference
    assert manifest.is_complete(out) and storage.exists(os.path.join(out, "config.yaml"))
    again = main(config)  # complete: skipped, nothing rewritten
    assert again["updated_at"] == final["updated_at"]


def test_s3_target_in_and_out_rewrite_mode_with_bad_rows(kit_rows, target_dir, s3_bucket, tmp_path, monkeypatch):
    """Target, prompts and output all on S3; the driver fetches only the target's metadata, the
    engine actor downloads the weights itself (into the cache named by the propagated env)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SD2_CACHE_DIR", str(cache))
    target = f"s3://{s3_bucket}/models/target"
    storage.copy_dir(target_dir, target)
    driver_copies = []
    real_copy_dir = storage.copy_dir
    monkeypatch.setattr(storage, "copy_dir", lambda src, dst: (driver_copies.append(src), real_copy_dir(src, dst)))
    rows = kit_rows[56:66]
    bad = [
        {"id": "no-prompt", "response": "x"},
        {"id": "int-prompt", "prompt": 7},
        {"id": "bad-messages", "messages": "hello"},
        {"id": "too-long", "prompt": "def f(): pass\n" * 200, "response": "ok"},
    ]
    prompts = f"s3://{s3_bucket}/in/prompts.jsonl"
    write_jsonl(prompts, rows[:5] + bad + rows[5:])
    out = f"s3://{s3_bucket}/runs/distilled"
    config = DistillConfig(
        target=target,
        prompts=prompts,
        output=out,
        mode="rewrite",
        actors=1,
        batch_size=5,
        shard_size=7,
        max_new_tokens=24,
        max_prompt_tokens=400,
    )
    final = main(config)
    assert manifest.is_complete(out)
    totals = final["totals"]
    assert (totals["rows_in"], totals["rows_out"], totals["skipped"], totals["failed"]) == (14, 10, 4, 0)
    assert totals["from_target"] + totals["from_reference"] == 10
    assert [s["rows_in"] for s in final["shards"]] == [7, 7]
    assert [s["skipped"] for s in final["shards"]] == [2, 2]
    skipped = [json.loads(line) for line in storage.read_text(f"{out}/{core.SKIPPED_FILE}").splitlines()]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert set(reasons) == {"no-prompt", "int-prompt", "bad-messages", "too-long"}
    assert "max_prompt_tokens=400" in reasons["too-long"]
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]
    for r in result:
        assert r["source"] in ("target", "reference") and r["error"] is None
        if r["source"] == "reference":
            assert r["response"] == r["reference"] and r["rejected"]
        assert "Reference answer" not in r["messages"][0]["content"]  # the original instruction is kept
    assert storage.exists(f"{out}/config.yaml") and storage.exists(f"{out}/shard-00001.parquet")
    assert not any(src.startswith(target) for src in driver_copies)  # no whole-model download on the driver
    cached = {name: os.listdir(cache / "s3" / name) for name in os.listdir(cache / "s3") if not name.endswith(".lock")}
    weights = [name for name, files in cached.items() if "model.safetensors" in files]
    metadata = [
        name for name, files in cached.items() if "tokenizer.json" in files and "model.safetensors" not in files
    ]
    assert len(weights) == 1 and len(metadata) == 1, cached  # the actor's full copy, the driver's metadata


@pytest.mark.slow  # the default suite loses a generation node with its engine (tests/test_cluster_nodes.py)
def test_a_killed_engine_actor_is_restarted_and_every_row_arrives_once(kit_rows, target_dir, tmp_path):
    """SIGKILL one live engine actor mid-run: Ray restarts it (max_restarts) and retries its
    tasks; the job completes with every row exactly once. The actors are found by their Ray
    process title, in this test's Ray session only."""
    import threading

    from _ray_procs import our_raylet_pid, ray_worker_pids

    from sd2_ray.runtime import ensure_ray

    rows = kit_rows[66:90]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = str(tmp_path / "out")
    config = DistillConfig(
        target=target_dir,
        prompts=prompts,
        output=out,
        actors=2,
        batch_size=2,
        shard_size=4,
        max_new_tokens=32,
        max_restarts=2,
    )
    records = os.path.join(out, core.RECORDS_DIR)
    ensure_ray()  # the job joins this Ray; its raylet tells our actors from other sessions'
    raylet = our_raylet_pid()
    title = "MapBatches(TransformersBatchUDF)"
    killed: dict = {"seen": set()}
    finished = threading.Event()

    def kill_one_actor_mid_run() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not finished.is_set():
            pids = ray_worker_pids(title, raylet)
            killed["seen"].update(pids)
            if "pid" not in killed and len(pids) >= 2 and os.path.isdir(records) and os.listdir(records):
                killed["shards_done"] = len(os.listdir(records))
                killed["before"] = set(killed["seen"])
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    try:
        final = main(config)
    finally:
        finished.set()
        killer.join(timeout=5)
    assert "pid" in killed, "no actor was killed"
    assert killed["shards_done"] < 6, "the kill came after the last shard: nothing was interrupted"
    assert killed["seen"] - killed["before"], "no new engine actor process after the kill"  # the restart
    assert final["status"] == "complete" and final["totals"]["rows_out"] == 24
    assert final["totals"]["failed"] == 0
    ids = output_ids(out)
    assert ids == [r["id"] for r in rows]  # every row once, in input order


def test_top_k_rows_on_ray_align_with_the_ids_and_feed_the_loss_check(kit_rows, target_dir, tmp_path):
    """logprobs_top_k through the actor pool: Parquet list columns aligned with response_ids,
    greedy top-1 = the token produced, and the fine-tune data check accepts the schema."""
    import numpy as np
    import pyarrow.parquet as pq

    from sd2_ray.errors import ConfigError
    from sd2_ray.finetune.config import FinetuneConfig, check_loss_data

    rows = kit_rows[90:98]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = str(tmp_path / "out")
    final = main(
        DistillConfig(
            target=target_dir,
            prompts=prompts,
            output=out,
            actors=1,
            batch_size=4,
            shard_size=4,
            max_new_tokens=24,
            logprobs_top_k=5,
        )
    )
    assert final["status"] == "complete" and final["logprobs_top_k"] == 5 and final["totals"]["rows_out"] == 8
    result = core.read_distilled(out)
    for r in result:
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == len(r["response_ids"])
        assert len(r["response_ids"]) == r["response_tokens"] + (r["finish_reason"] == "stop")
        assert [ids[0] for ids in r["topk_ids"]] == r["response_ids"]
        assert all(len(lp) == 5 and lp == sorted(lp, reverse=True) for lp in r["topk_logprobs"])
    assert any(r["finish_reason"] == "stop" for r in result)
    columns = pq.read_schema(os.path.join(out, core.shard_file(0))).names
    finetune = FinetuneConfig(model="M", data=out, output="O", loss="tvd")
    check_loss_data(finetune, columns)
    plain = str(tmp_path / "plain")
    main(
        DistillConfig(
            target=target_dir,
            prompts=prompts,
            output=plain,
            actors=1,
            batch_size=4,
            shard_size=8,
            max_new_tokens=24,
            limit=4,
        )
    )
    with pytest.raises(ConfigError, match="field 'loss'"):
        check_loss_data(finetune, pq.read_schema(os.path.join(plain, core.shard_file(0))).names)
    same = core.read_distilled(plain)
    assert [r["response"] for r in same] == [r["response"] for r in result[:4]]  # top-k changes no text
    assert np.isfinite(np.concatenate([np.ravel(r["topk_logprobs"]) for r in result])).all()


def test_on_policy_cli_drafter_writes_and_target_scores(kit_rows, kit_dir, target_dir, tmp_path):
    from sd2_ray import cli
    from sd2_ray.distill.scoring import score_continuations
    from sd2_ray.models.io import load_model, load_tokenizer

    rows = kit_rows[98:104]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = str(tmp_path / "out")
    drafter = os.path.join(kit_dir, "drafter")
    code = cli.main(
        [
            "distill",
            "--target",
            target_dir,
            "--prompts",
            prompts,
            "--output",
            out,
            "--mode",
            "on-policy",
            "--drafter",
            drafter,
            "--logprobs-top-k",
            "4",
            "--actors",
            "1",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "16",
        ]
    )
    assert code == 0
    result = core.read_distilled(out)
    assert len(result) == 6 and {r["source"] for r in result} == {"drafter"}
    tok = load_tokenizer(target_dir)
    requests, _ = core.prepare_rows(rows, tok, "generate", 10_000, 8)
    scored = score_continuations(
        load_model(target_dir),
        [r.prompt_ids for r in requests],
        [r["response_ids"] for r in result],
        4,
        tok.pad_token_id,
    )
    import numpy as np

    for r, (ids, lps) in zip(result, scored, strict=True):
        assert r["topk_ids"] == ids.tolist() and np.allclose(r["topk_logprobs"], lps, atol=1e-4)
    assert any([ids[0] for ids in r["topk_ids"]] != r["response_ids"] for r in result)  # the drafter's words
