"""Toy inputs for tests and benchmarks of the fine-tuning stage (built in well under a second):
a magnitude-pruned tiny drafter with masks (saved with :func:`sd2_ray.testing.tokenizer.toy_tokenizer`,
one token per character, which fits the tiny random models' vocabulary) and a distilled-style
Parquet dataset with a learnable pattern."""

from __future__ import annotations

import random

import torch

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "omega",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "ember",
    "frost",
    "lunar",
    "solar",
    "pixel",
    "quartz",
]


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """The decoder blocks' linear layers (embeddings and LM head stay dense, as in SD²)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep the largest-magnitude (1 - sparsity) of each decoder linear weight."""
    from sd2_ray.prune.magnitude import magnitude_prune

    modules = dict(model.named_modules())
    return {
        f"{name}.weight": magnitude_prune(modules[name].weight, sparsity)[1] for name in decoder_linear_names(model)
    }


def make_sparse_drafter(out_dir: str, sparsity: float = 0.5, arch: str = "llama", seed: int = 0, **model_kwargs) -> str:
    """Save a tiny random model pruned to ``sparsity`` with masks/masks.safetensors + sparsity.json."""
    from sd2_ray.models.sparsity import apply_masks, save_masks, sparsity_of
    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import toy_tokenizer

    model = tiny_model(arch, seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)
    toy_tokenizer().save_pretrained(out_dir)
    if sparsity > 0:
        masks = magnitude_masks(model, sparsity)
        apply_masks(model, masks)
        model.save_pretrained(out_dir)
        layers = {k[: -len(".weight")]: {"sparsity": sparsity_of(m)} for k, m in masks.items()}
        save_masks(
            out_dir,
            masks,
            {
                "method": "magnitude",
                "pattern": "unstructured",
                "target_sparsity": sparsity,
                "total_sparsity": sparsity,
                "layers": layers,
            },
        )
    return out_dir


def toy_rows(n: int, seed: int = 0, field: str = "response") -> list[dict]:
    """Instruction rows with a learnable answer: repeat a word a given number of times."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word, times = rng.choice(WORDS), rng.randint(2, 4)
        rows.append(
            {
                "id": f"toy-{i}",
                "messages": [{"role": "user", "content": f"repeat {word} {times} times"}],
                field: " ".join([word] * times),
                "finish_reason": "stop",
            }
        )
    return rows


def write_toy_dataset(path: str, n: int = 64, seed: int = 0, shards: int = 2, field: str = "response") -> str:
    """Write ``n`` toy rows as Parquet shards under ``path`` (local or s3://)."""
    import pyarrow as pa

    from sd2_ray import storage

    rows = toy_rows(n, seed, field)
    per = (n + shards - 1) // shards
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        if part:
            storage.write_parquet(storage.join(path, f"part-{s:05d}.parquet"), pa.Table.from_pylist(part))
    return path


def with_toy_topk(rows: list[dict], tokenizer, k: int = 4, top_prob: float = 0.7, rest: float = 0.1) -> list[dict]:
    """``rows`` as distilled with ``logprobs_top_k`` = k by a target that puts ``top_prob`` on each
    response token, spreads the rest of its top-k mass evenly over k - 1 other ids and leaves
    ``rest`` outside them: ``response_ids`` (the text's ids + EOS), ``topk_ids``, ``topk_logprobs``."""
    import math

    vocab = len(tokenizer)
    other = math.log((1.0 - top_prob - rest) / (k - 1))
    out = []
    for row in rows:
        ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        topk = [[t] + [(t + j * 7) % vocab for j in range(1, k)] for t in ids]
        logprobs = [[math.log(top_prob)] + [other] * (k - 1) for _ in ids]
        out.append({**row, "response_ids": ids, "topk_ids": topk, "topk_logprobs": logprobs})
    return out


def toy_worker_config(model: str = "toy", total_steps: int = 1, **fields):
    """A fine-tune worker's config as the driver builds it: the defaults of a FinetuneConfig with
    ``fields`` set (no data, no output is read)."""
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.worker_config import worker_config

    config = FinetuneConfig(model=model, data="unused", output="unused", **fields)
    return worker_config(config, total_steps)
