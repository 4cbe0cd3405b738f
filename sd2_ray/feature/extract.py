"""The target's side of a feature head's training (pure: no Ray).

:class:`FeatureExtractor` is the callable the feature stream's actors run (:mod:`sd2_ray.feature.
stream` places it on Ray Data): distilled rows in, one *feature row* out per row, holding what the
head learns from that sequence and nothing else:

    row_id      the distilled row's id (exactly-once checks, the cache)
    input_ids   (T,)  prompt + response in the target's tokens (the fine-tune stage's encoding)
    loss_mask   (T,)  1 on response tokens
    features    (T, L*H)  the target's hidden states at the head's layers (float32)
    top         (T, H)    what the target's LM head reads; only when the layers are not just that
    target_ids  (T,)  the target's argmax at every position (the token the head learns to draft)

The target's logits are never shipped (a 128k vocabulary would be 0.5 MB per token); the argmax
is what greedy drafting needs. :func:`load_target_parts` gives a training worker the two target
modules a head borrows (embedding, LM head) without loading the rest of the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FEATURE_COLUMNS = ("row_id", "input_ids", "loss_mask", "features", "top", "target_ids")


@dataclass(frozen=True)
class ExtractSettings:
    """What the extractor needs besides the target (plain data: it crosses the Ray boundary)."""

    layers: tuple[int, ...]
    seq_len: int
    response_field: str = "response"
    use_response_ids: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    torch_threads: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractSettings:
        return cls(**{**data, "layers": tuple(data["layers"])})


class FeatureExtractor:
    """Loads the target once; maps batches of distilled rows to feature rows (module docstring)."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        from sd2_ray.models.io import load_model, load_tokenizer

        self.settings = ExtractSettings.from_dict(settings)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        dtype = getattr(torch, self.settings.dtype)
        self.target = load_model(model_dir, dtype=dtype, device=self.settings.device)
        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, batch) -> dict[str, list]:
        """``batch``: a pyarrow table (the stream asks Ray Data for that format)."""
        return extract_rows(self.target, self.tokenizer, batch.to_pylist(), self.settings)


def extract_rows(target, tokenizer, rows: list[dict], settings: ExtractSettings) -> dict[str, list]:
    """Feature rows (column -> one entry per row) of distilled ``rows``, one target forward."""
    from sd2_ray.feature.features import target_pass
    from sd2_ray.finetune.data import encode_row
    from sd2_ray.rows import row_id

    examples = [
        encode_row(row, tokenizer, settings.seq_len, settings.response_field, settings.use_response_ids) for row in rows
    ]
    width = max(len(e.input_ids) for e in examples)
    device = target.get_input_embeddings().weight.device
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    tp = target_pass(target, ids.to(device), mask.to(device), settings.layers)
    argmax = tp.logits.argmax(-1).cpu()
    features, top = tp.features.float().cpu().numpy(), tp.top.float().cpu().numpy()
    out: dict[str, list] = {name: [] for name in FEATURE_COLUMNS}
    for i, (row, e) in enumerate(zip(rows, examples, strict=True)):
        n = len(e.input_ids)
        out["row_id"].append(row_id(row))
        out["input_ids"].append(np.asarray(e.input_ids, dtype=np.int32))
        out["loss_mask"].append(np.asarray([int(label >= 0) for label in e.labels], dtype=np.int8))
        out["features"].append(features[i, :n])
        out["top"].append(None if settings.layers == (-1,) else top[i, :n])
        out["target_ids"].append(argmax[i, :n].numpy().astype(np.int32))
    if settings.layers == (-1,):
        del out["top"]  # the features are what the LM head reads: not shipped twice
    return out


class TargetParts:
    """The target's embedding and LM head alone, with the accessor names a head reads."""

    def __init__(self, config, embed: torch.nn.Module, lm_head: torch.nn.Module):
        self.config = config
        self.embed, self.lm_head = embed, lm_head

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def load_target_parts(model_dir: str, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> TargetParts:
    """The target's input embedding and LM head, read alone from its safetensors (a 70B target's
    other weights never reach a training worker). Tied embeddings share one tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sd2_ray.models.io import resolve_model_dir

    local = resolve_model_dir(model_dir)
    config = AutoConfig.from_pretrained(local)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    names = {id(module): name for name, module in shell.named_modules()}
    embed_name = names[id(shell.get_input_embeddings())]
    head_name = names[id(shell.get_output_embeddings())]
    tensors = _read_tensors(local, {f"{embed_name}.weight", f"{head_name}.weight"})
    if f"{embed_name}.weight" not in tensors:
        raise FileNotFoundError(f"{local}: no {embed_name}.weight in its safetensors")
    embed_weight = tensors[f"{embed_name}.weight"]
    head_weight = tensors.get(f"{head_name}.weight", embed_weight)  # tied: absent from the file
    embed = torch.nn.Embedding.from_pretrained(embed_weight.to(dtype), freeze=True)
    lm_head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
    lm_head.weight = torch.nn.Parameter(head_weight.to(dtype), requires_grad=False)
    return TargetParts(config, embed.to(device), lm_head.to(device))


def _read_tensors(local: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a model dir's safetensors files (sharded or not); names missing from
    every file are left out."""
    import glob
    import os

    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(local, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in names & set(f.keys()):
                found[name] = f.get_tensor(name)
    return found
