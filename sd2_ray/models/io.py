"""Load and save Hugging Face model directories from local paths or s3://.

Contract (DESIGN.md): a model is an HF directory (config.json, safetensors, tokenizer files).
Pickled weights are never loaded and ``trust_remote_code`` stays off unless asked for.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

from sd2_ray import storage
from sd2_ray.errors import DataError

WEIGHT_SUFFIXES = (".safetensors",)


def resolve_model_dir(path: str) -> str:
    """Local directory of a model given as a local path or s3:// prefix, checked for weights."""
    try:
        local = storage.local_dir(path)
    except FileNotFoundError:
        raise DataError(f"{path}: model directory not found") from None
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise DataError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(local)):
        raise DataError(f"{path}: model directory has no safetensors weights")
    return local


def load_model(path: str, dtype: Any = None, trust_remote_code: bool = False, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    local = resolve_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        local, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    return model.to(device).eval()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        local = storage.local_dir(path)
    except FileNotFoundError:
        raise DataError(f"{path}: tokenizer directory not found") from None
    tok = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save_model(model, out: str, tokenizer=None, extra_files: dict[str, bytes] | None = None) -> None:
    """Save as safetensors to a local dir or s3:// prefix (staged locally, then copied)."""
    if storage.is_s3(out):
        with tempfile.TemporaryDirectory(prefix="sd2-save-") as tmp:
            _save_local(model, tmp, tokenizer, extra_files)
            storage.copy_dir(tmp, out)
        return
    _save_local(model, out, tokenizer, extra_files)


def _save_local(model, out: str, tokenizer, extra_files) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for name, data in (extra_files or {}).items():
        storage.write_bytes(os.path.join(out, name), data)
