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

# The small files of a model dir: everything a driver needs to plan work (tokenize prompts, read
# the architecture, EOS ids, chat template, sparsity report) without the weights.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template*",
    "*.jinja",
    "sparsity.json",
)


def check_model_dir(path: str) -> None:
    """Raise DataError unless ``path`` (local or s3://) is an HF model dir with whole safetensors
    weights; reads the file listing and each weight file's header (a few KB), never the weights."""
    if not storage.is_dir(path):
        raise DataError(f"{path}: model directory not found")
    _check_names(path, {storage.basename(f) for f in storage.list_files(path)})
    for file in storage.list_files(path, recursive=True):  # the weights, and the masks below them
        if file.endswith(WEIGHT_SUFFIXES):
            check_safetensors(file)


def check_safetensors(path: str) -> None:
    """A safetensors file must hold its header and every tensor the header lists: a truncated
    copy (an interrupted upload or download) is a DataError naming the file, before any worker
    tries to load it. Reads 8 bytes, the header and the size; random access works on S3 too."""
    import json
    import struct

    fs, inner = storage.filesystem(path)
    with storage.s3_errors(path), fs.open_input_file(inner) as f:
        size = f.size()
        head = f.read(8) if size >= 8 else b""
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        problem = None
        if length is None or 8 + length > size:
            problem = "header incomplete"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if 8 + length + end > size:
                    problem = f"{size} bytes, the header lists {8 + length + end}"
            except (ValueError, KeyError, TypeError):
                problem = "header is not safetensors JSON"
    if problem:
        raise DataError(f"{path}: truncated or damaged safetensors file ({problem})")


def _check_names(path: str, names: set[str]) -> None:
    if "config.json" not in names:
        raise DataError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise DataError(f"{path}: model directory has no safetensors weights")


def resolve_model_dir(path: str) -> str:
    """Local directory of a model given as a local path or s3:// prefix, checked for weights.

    Downloads the whole model when ``path`` is on S3: call it where the weights are loaded (in
    the actor/worker/task), not on a driver that only needs metadata (:func:`model_metadata_dir`).
    """
    try:
        local = storage.local_dir(path)
    except FileNotFoundError:
        raise DataError(f"{path}: model directory not found") from None
    _check_names(path, set(os.listdir(local)))
    return local


def model_metadata_dir(path: str, extra: tuple[str, ...] = ()) -> str:
    """Local directory with only the small files of a model (:data:`METADATA_FILES` plus the
    ``extra`` patterns), for a driver: an s3:// model's weights are not downloaded. The model
    dir is checked first (config.json and weights present) from its listing."""
    check_model_dir(path)
    return storage.local_dir(path, include=METADATA_FILES + tuple(extra))  # a local dir is used as is


def load_model(
    path: str, dtype: Any = None, trust_remote_code: bool = False, device: Any = "cpu", device_map: Any = None
):
    """A causal LM (or an image-text-to-text model: a LLaVA target or MASSV drafter) in eval
    mode, on ``device`` (loaded straight onto it, no CPU copy first), or placed by an accelerate
    ``device_map`` (e.g. ``"auto"``: a model too big for one GPU sharded over the visible GPUs of
    this process); ``device_map`` wins over ``device``."""
    import torch

    local = resolve_model_dir(path)
    if device_map is None and str(device) != "cpu":
        device_map = {"": str(device)}
    try:
        model = auto_class(local).from_pretrained(
            local,
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map=device_map,
        )
    except Exception as err:  # noqa: BLE001 - a damaged model dir is the user's to fix, in one line
        if type(err).__name__ == "SafetensorError" or isinstance(err, (OSError, ValueError, KeyError)):
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise DataError(f"{path}: cannot load the model ({type(err).__name__}: {first})") from None
        raise
    return (model if device_map is not None else model.to(device)).eval()


IMAGE_TEXT_TYPES = ("llava",)  # model_type of the vision-language checkpoints the stages load


def auto_class(local: str):
    """The transformers auto class of a local model dir: image-text-to-text for a LLaVA
    checkpoint (AutoModelForCausalLM does not map it), else causal LM."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = os.path.join(local, "config.json")
    model_type = None
    if os.path.isfile(config):
        with open(config) as f:
            model_type = json.load(f).get("model_type")
    return AutoModelForImageTextToText if model_type in IMAGE_TEXT_TYPES else AutoModelForCausalLM


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
