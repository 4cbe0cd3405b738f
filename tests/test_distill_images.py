"""Distillation of image + text prompt rows for a vision-language (LLaVA) target: the pure
preparation (image tokens, references resolved against the prompts file, bad image fields
skipped), input a run cannot take refused in one line, and a run on local Ray with the tiny
untrained LLaVA where a missing and a corrupt image are counted skips, every other row is
written once (greedy text equal to the model's own ``generate`` with the image), and a resumed
run redoes only the unfinished shard."""

from __future__ import annotations

import json
import os

import pytest

from sd2_ray import manifest, storage
from sd2_ray.distill import core, image_rows
from sd2_ray.distill.config import DistillConfig
from sd2_ray.errors import ConfigError, DataError
from sd2_ray.vision import scenes
from sd2_ray.vision.images import resolve_ref


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    from sd2_ray.testing.vision import tiny_vision_dirs

    return tiny_vision_dirs(str(tmp_path_factory.mktemp("vlm")))


@pytest.fixture(scope="module")
def tok(vlm_dirs):
    from sd2_ray.models.io import load_tokenizer

    return load_tokenizer(vlm_dirs["target"])


def scene_rows(count: int, split: str = "eval") -> list[dict]:
    return [
        {"id": e["key"], "messages": e["messages"], "response": e["response"], "image": e["image"]}
        for e in scenes.examples(count, 3, split)
    ]


def png_file(path, seed: int) -> str:
    import random

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(scenes.png_bytes(scenes.draw(scenes.random_scene(random.Random(seed)))))
    return str(path)


def test_core_prepares_image_rows_for_a_llava_target(vlm_dirs, tok, tmp_path):
    target = image_rows.vision_target(vlm_dirs["target"], str(tmp_path / "prompts.jsonl"))
    assert target is not None and target.base_dir == str(tmp_path) and target.patches == 4
    assert image_rows.vision_target(vlm_dirs["text_drafter"], str(tmp_path)) is None
    url = scene_rows(1)[0]["image"]
    question = [{"role": "user", "content": "Describe the image."}]
    rows = [
        {"messages": question, "image": url},  # no mark: one is put in front
        {"messages": question, "image": "imgs/a.png"},  # same question, another image: another id
        {"prompt": "Compare <image> with <image>.", "images": [url, "/abs/b.png"]},
        {"prompt": "What is 2 + 2?", "id": "text"},  # a text row still works
        {"messages": [{"role": "user", "content": "<image><image> two marks"}], "image": url},
        {"messages": question, "image": 7},
        {"messages": question, "images": "imgs/a.png"},  # a string, not a list
        {"messages": question, "image": url, "images": [url]},
    ]
    requests, skipped = core.prepare_rows(rows, tok, "generate", 1000, 4, target)
    assert [r.index for r in requests] == [0, 1, 2, 3]
    assert [s["index"] for s in skipped] == [4, 5, 6, 7]
    assert "2 <image> marks for 1 image" in skipped[0]["reason"]
    assert "'image' must be a string" in skipped[1]["reason"] and "'images' must be a list" in skipped[2]["reason"]
    assert "both 'image' and 'images'" in skipped[3]["reason"]
    first, relative, two, text = requests
    assert first.id != relative.id  # content ids include the image references
    assert relative.image == str(tmp_path / "imgs" / "a.png") and relative.images is None
    assert two.images == [url, "/abs/b.png"] and two.image is None
    count = lambda r: sum(1 for t in r.prompt_ids if t == target.image_token)  # noqa: E731
    assert [count(r) for r in requests] == [4, 4, 8, 0]
    assert "<image>" in first.prompt_text and first.messages == question  # the row's own messages kept
    assert first.engine_item(with_images=True)["images"] == [url] and "images" not in first.engine_item()
    assert text.engine_item(with_images=True)["images"] == []
    # a text row's ids for a LLaVA target are the text path's ids
    plain, _ = core.prepare_rows([rows[3]], tok, "generate", 1000, 4)
    assert plain[0].prompt_ids == text.prompt_ids
    assert resolve_ref("imgs/./x.png", "s3://b/in") == "s3://b/in/imgs/x.png"
    assert resolve_ref(url, "s3://b/in") == url and resolve_ref("s3://c/y.png", "/d") == "s3://c/y.png"


def test_core_counts_engine_skips_and_writes_image_columns(tok, vlm_dirs, tmp_path):
    target = image_rows.vision_target(vlm_dirs["target"], str(tmp_path / "p.jsonl"))
    requests, _ = core.prepare_rows(scene_rows(3), tok, "generate", 1000, 8, target)
    answers = [
        core.Generated(0, "a red square", "stop", 3, token_ids=[5, 6, 7, 2]),
        core.Generated(1, None, None, 0, skipped="image: cannot read /x.png (FileNotFoundError)"),
        core.Generated(2, None, None, 0, skipped="image: not a readable image (UnidentifiedImageError)"),
    ]
    kept, skipped = core.split_skipped(list(zip(requests, answers, strict=True)))
    assert [r.index for r, _ in kept] == [0] and [s["index"] for s in skipped] == [1, 2]
    assert skipped[0] == {"index": 1, "shard": 0, "id": requests[1].id, "reason": answers[1].skipped}
    results = [core.result_row(r, g, "generate", False) for r, g in kept]
    record = core.shard_record(0, "fp", 3, results, skipped)
    assert (record["rows_out"], record["skipped"], record["bad_images"], record["failed"]) == (1, 2, 2, 0)
    table = core.result_table(results, images=True)
    assert table.column("image").to_pylist() == [requests[0].image]
    assert "image" not in core.result_table(results).column_names  # a text target's output is unchanged


def test_input_a_run_cannot_take_is_one_line_exit_2(vlm_dirs, tmp_path, capsys):
    from sd2_ray import cli

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello", "id": "t"}, *scene_rows(2)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_target = vlm_dirs["text_drafter"]
    config = DistillConfig(target=text_target, prompts=str(prompts), output=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"row 2 \(id 'eval-0'\) has field 'image'.*text-only"):
        image_rows.check_input(rows, config, None)
    base = ["distill", "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    assert cli.main([*base, "--target", text_target]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has field 'image'" in err and "text-only" in err, err
    assert cli.main([*base, "--target", vlm_dirs["target"], "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'engine'" in err and "image rows" in err, err
    target = image_rows.vision_target(vlm_dirs["target"], str(prompts))
    with pytest.raises(ConfigError, match="field 'logprobs_top_k'"):
        image_rows.check_input(rows, config.model_copy(update={"logprobs_top_k": 4}), target)
    with pytest.raises(ConfigError, match="field 'engine'"):  # its text rows alone too
        image_rows.check_input(rows[:1], config.model_copy(update={"engine": "vllm"}), target)
    image_rows.check_input(rows[:1], config, None)  # text rows, text target: nothing to refuse
    assert not os.path.exists(tmp_path / "out")  # refused before any output


@pytest.mark.ray
def test_image_rows_on_ray_skip_bad_images_once_and_resume(vlm_dirs, tmp_path, monkeypatch):
    import torch

    from sd2_ray.distill.job import main
    from sd2_ray.vision.images import image_processor, load_image, pixel_values
    from sd2_ray.vision.model import load_vlm

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a private Ray: never another session's cluster
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    good = scene_rows(4)
    png_file(data / "imgs" / "a.png", 1)
    (data / "imgs" / "corrupt.png").write_bytes(b"these bytes are not an image")
    rows = [
        good[0],
        {**good[1], "id": "missing", "image": "imgs/missing.png"},
        {**good[2], "id": "relative", "image": "imgs/a.png"},
        {**good[3], "id": "corrupt", "image": "imgs/corrupt.png"},
        {
            "id": "two",
            "prompt": "<image> and <image>: which has more shapes?",
            "images": [good[0]["image"], "imgs/a.png"],
        },
        {"id": "text", "prompt": "Name a colour."},
        {"id": "base64", "messages": good[1]["messages"], "image": good[1]["image"].split(",", 1)[1]},
    ]
    prompts = data / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    config = DistillConfig(
        target=vlm_dirs["target"],
        prompts=str(prompts),
        output=out,
        actors=1,
        batch_size=2,
        shard_size=3,
        max_new_tokens=6,
        cpus_per_actor=1,
    )
    final = main(config)
    totals = final["totals"]
    assert final["status"] == "complete" and final["num_shards"] == 3
    assert (totals["rows_in"], totals["rows_out"], totals["skipped"], totals["bad_images"], totals["failed"]) == (
        7,
        5,
        2,
        2,
        0,
    )
    skipped = {s["id"]: s["reason"] for s in map(json.loads, storage.read_text(f"{out}/_skipped.jsonl").splitlines())}
    assert set(skipped) == {"missing", "corrupt"}
    assert "cannot read" in skipped["missing"] and "missing.png" in skipped["missing"]
    assert "not a readable image" in skipped["corrupt"]
    result = core.read_distilled(out)
    assert [r["id"] for r in result] == [good[0]["id"], "relative", "two", "text", "base64"]
    by_id = {r["id"]: r for r in result}
    assert by_id["relative"]["image"] == str(data / "imgs" / "a.png")  # absolute: fine-tuning can read it
    assert by_id["two"]["images"] == [good[0]["image"], str(data / "imgs" / "a.png")] and by_id["two"]["image"] is None
    assert by_id["text"]["image"] is None and by_id["text"]["images"] is None
    assert all(r["source"] == "target" and r["response_ids"] for r in result)

    # greedy = the LLaVA model's own generate with the image
    from sd2_ray.models.io import load_tokenizer

    model, tok = load_vlm(vlm_dirs["target"]), load_tokenizer(vlm_dirs["target"])
    target = image_rows.vision_target(vlm_dirs["target"], str(prompts))
    requests, _ = core.prepare_rows([rows[2]], tok, "generate", 1000, 3, target)
    pixels = pixel_values([load_image(requests[0].image)], image_processor(model.config))
    with torch.inference_mode():
        ids = torch.tensor([requests[0].prompt_ids])
        direct = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert (
        by_id["relative"]["response_ids"]
        == direct[0, ids.shape[1] :].tolist()[: len(by_id["relative"]["response_ids"])]
    )

    # complete: a rerun writes nothing; an interrupted run redoes only its unfinished shard
    mtimes = {f: os.path.getmtime(f) for f in storage.list_files(out, suffix=".parquet")}
    assert main(config)["updated_at"] == final["updated_at"]
    os.remove(os.path.join(out, core.record_file(2)))
    os.remove(manifest.path_of(out))
    again = main(config)  # the same Ray (conftest shuts it down after the module)
    assert again["totals"] == totals
    assert [r["id"] for r in core.read_distilled(out)] == [r["id"] for r in result]
    after = {f: os.path.getmtime(f) for f in storage.list_files(out, suffix=".parquet")}
    assert [after[f] == mtimes[f] for f in sorted(after)] == [True, True, False]
    assert len(storage.read_text(f"{out}/_skipped.jsonl").splitlines()) == 2  # shard 0's skips, from its record
