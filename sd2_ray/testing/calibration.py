"""Inputs for the prune tests: small calibration rows and files, and a saved tiny model with
:func:`sd2_ray.testing.tokenizer.ascii_tokenizer` (one token per character, the tiny models' 96
ids), so the whole CLI path runs without the model kit."""

from __future__ import annotations

import json
import os

WORDS = (
    "the model prunes weights while keeping the outputs close to the dense ones and "
    "every block sees inputs from the pruned blocks before it so errors do not pile up"
).split()


def calibration_rows(count: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 25)))
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": prompt}], "response": response})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def save_tiny(arch: str, out: str, seed: int = 0, **kwargs) -> str:
    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import ascii_tokenizer

    model = tiny_model(arch, seed=seed, **kwargs)
    model.save_pretrained(out)
    ascii_tokenizer().save_pretrained(out)
    return os.fspath(out)
