"""Fetching models from S3: the driver's metadata-only copy (no weights), the listing-only model
check, and the node cache shared safely by concurrent processes (one download, no torn copy)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from sd2_ray import storage
from sd2_ray.errors import DataError
from sd2_ray.models.io import check_model_dir, model_metadata_dir, resolve_model_dir


@pytest.fixture
def s3_target(kit_dir, s3_bucket, tmp_path, monkeypatch):
    """The kit's trained target uploaded to the loopback S3 server; a private cache dir."""
    monkeypatch.setenv("SD2_CACHE_DIR", str(tmp_path / "cache"))
    remote = f"s3://{s3_bucket}/models/target"
    storage.copy_dir(os.path.join(kit_dir, "target"), remote)
    return remote


def test_metadata_dir_has_config_and_tokenizer_but_no_weights(s3_target, kit_dir):
    from transformers import AutoConfig

    from sd2_ray.models.io import load_tokenizer

    meta = model_metadata_dir(s3_target)
    names = set(os.listdir(meta))
    assert not any(n.endswith(".safetensors") for n in names)  # the weights stayed on S3
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    local_tok = load_tokenizer(os.path.join(kit_dir, "target"))
    tok = load_tokenizer(meta)
    text = "def add(a, b):\n    return a + b"
    assert tok(text)["input_ids"] == local_tok(text)["input_ids"]
    assert tok.chat_template == local_tok.chat_template and tok.chat_template
    assert AutoConfig.from_pretrained(meta).num_hidden_layers >= 1
    assert model_metadata_dir(s3_target) == meta  # cached
    full = resolve_model_dir(s3_target)  # a separate cache entry that does hold the weights
    assert full != meta and any(n.endswith(".safetensors") for n in os.listdir(full))
    assert not any(n.endswith(".safetensors") for n in os.listdir(meta))


def test_metadata_dir_of_a_local_model_is_the_dir_itself(kit_dir):
    target = os.path.join(kit_dir, "target")
    assert model_metadata_dir(target) == os.path.abspath(target)


def test_model_check_reads_the_listing_only(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SD2_CACHE_DIR", str(tmp_path / "cache"))
    base = f"s3://{s3_bucket}/models"
    storage.write_text(f"{base}/no-weights/config.json", "{}")
    storage.write_text(f"{base}/no-config/model.safetensors", "x")
    with pytest.raises(DataError, match="no-weights: model directory has no safetensors"):
        check_model_dir(f"{base}/no-weights")
    with pytest.raises(DataError, match="no-config: not a Hugging Face model directory"):
        model_metadata_dir(f"{base}/no-config")
    with pytest.raises(DataError, match="missing: model directory not found"):
        check_model_dir(f"{base}/missing")
    assert not os.path.exists(tmp_path / "cache")  # nothing was downloaded to check them


def test_include_patterns_and_freshness(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SD2_CACHE_DIR", str(tmp_path / "cache"))
    remote = f"s3://{s3_bucket}/d"
    storage.write_text(f"{remote}/a.json", "1")
    storage.write_text(f"{remote}/big.bin", "x" * 1000)
    storage.write_text(f"{remote}/sub/a.json", "nested")  # patterns match the relative path
    only_json = storage.local_dir(remote, include=("*.json",))
    everything = storage.local_dir(remote)
    assert only_json != everything
    assert sorted(os.listdir(only_json)) == [".sd2-source.json", "a.json", "sub"]
    assert not os.path.exists(os.path.join(only_json, "big.bin"))
    top_only = storage.local_dir(remote, include=("a.json",))
    assert sorted(os.listdir(top_only)) == [".sd2-source.json", "a.json"]
    storage.write_text(f"{remote}/a.json", "22")  # a changed file refreshes the filtered copy
    assert open(os.path.join(storage.local_dir(remote, include=("*.json",)), "a.json")).read() == "22"
    storage.write_text(f"{remote}/big.bin", "y" * 5)  # a file outside the filter does not matter
    assert storage.local_dir(remote, include=("a.json",)) == top_only
    assert open(os.path.join(top_only, "a.json")).read() == "22"


CONCURRENT_FETCH = r"""
import hashlib, json, os, sys, time
from sd2_ray import storage

log, remote, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
real_copy = storage.copy_dir
def counted_copy(src, dst):
    with open(log, "a") as f:
        f.write("download\n")
    real_copy(src, dst)
storage.copy_dir = counted_copy
while time.time() < start_at:  # every process starts its fetch at the same moment
    time.sleep(0.001)
local = storage.local_dir(remote)
digest = {name: hashlib.sha256(open(os.path.join(local, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(local)) if not name.startswith(".")}
print(json.dumps({"local": local, "digest": digest}))
"""


def test_concurrent_processes_share_one_download(s3_bucket, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SD2_CACHE_DIR", str(cache))
    remote = f"s3://{s3_bucket}/models/big"
    blobs = {f"w{i}.safetensors": os.urandom(2_000_000) for i in range(3)}
    for name, data in blobs.items():
        storage.write_bytes(f"{remote}/{name}", data)
    storage.write_text(f"{remote}/config.json", "{}")
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in {**blobs, "config.json": b"{}"}.items()}
    script, log = tmp_path / "fetch.py", tmp_path / "downloads.log"
    script.write_text(CONCURRENT_FETCH)
    import time

    start_at = str(time.time() + 3.0)  # after all interpreters have imported pyarrow
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(log), remote, start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["local"] for r in results}) == 1
    assert all(r["digest"] == expected for r in results)  # every process read whole, equal files
    assert log.read_text().count("download") == 1  # the others waited and reused it
    leftovers = [n for n in os.listdir(cache / "s3") if n.startswith(".")]
    assert leftovers == []  # no temp download dirs left behind


def test_ray_llm_downloads_an_s3_model_source_from_the_configured_endpoint(s3_target, tmp_path, monkeypatch):
    """The vLLM engine passes an s3:// target straight to ray.data.llm: this guards that Ray's
    own per-actor download (the call its vLLM engine stage makes) reaches our S3 endpoint."""
    import huggingface_hub.constants
    from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray's download lock files go to ~
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # and the model here
    local = download_model_files(
        model_id=s3_target,
        mirror_config=None,
        download_model=NodeModelDownloadable.MODEL_AND_TOKENIZER,
        download_extra_files=False,
    )
    assert local.startswith(str(tmp_path / "hub")) and os.path.isdir(local)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(local))


def test_finetune_driver_check_fetches_masks_not_weights(tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    import torch

    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.inputs import check_model_and_masks as check_model
    from sd2_ray.models.sparsity import MASKS_FILE, save_masks

    monkeypatch.setenv("SD2_CACHE_DIR", str(tmp_path / "cache"))
    name = "model.layers.0.mlp.down_proj.weight"
    from safetensors.torch import load_file

    shape = load_file(os.path.join(tiny_model_dir, "model.safetensors"))[name].shape
    save_masks(tiny_model_dir, {name: torch.rand(shape) > 0.5}, {"layers": {name[:-7]: {}}})
    remote = f"s3://{s3_bucket}/models/pruned"
    storage.copy_dir(tiny_model_dir, remote)
    config = FinetuneConfig(model=remote, data=f"s3://{s3_bucket}/data.jsonl", output=str(tmp_path / "out"))
    local = check_model(config)
    names = {os.path.relpath(os.path.join(d, f), local) for d, _, files in os.walk(local) for f in files}
    assert {"config.json", MASKS_FILE, "sparsity.json"} <= names and "model.safetensors" not in names
    save_masks(tiny_model_dir, {name: torch.ones(3, 3, dtype=torch.bool)}, {"layers": {}})  # wrong shape
    storage.copy_dir(tiny_model_dir, remote)
    with pytest.raises(DataError, match="pruned"):
        check_model(config)


def test_serve_input_check_validates_s3_models_from_their_listing(kit_dir, s3_target, s3_bucket, tmp_path):
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.serve.http import free_port
    from sd2_ray.serve.job import check_inputs

    port = free_port()
    before = sorted(os.listdir(tmp_path / "cache" / "s3")) if (tmp_path / "cache" / "s3").exists() else []
    check_inputs(ServeConfig(target=s3_target, host="127.0.0.1", port=port))
    missing = f"s3://{s3_bucket}/models/no-drafter"
    with pytest.raises(DataError, match="no-drafter: model directory not found"):
        check_inputs(ServeConfig(target=s3_target, drafter=missing, host="127.0.0.1", port=port))
    after = sorted(os.listdir(tmp_path / "cache" / "s3")) if (tmp_path / "cache" / "s3").exists() else []
    assert after == before  # validated without downloading anything
