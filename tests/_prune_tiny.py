"""Helpers for the prune tests: a character-level tokenizer that fits the tiny random models
(vocab 96) and small calibration files, so the whole CLI path runs without the model kit."""

from __future__ import annotations

import json
import os

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in sd2_ray.models.tiny
CHARS = [chr(c) for c in range(32, 32 + 92)]  # 4 + 92 = 96 ids
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


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
    from sd2_ray.models.tiny import tiny_model

    model = tiny_model(arch, seed=seed, **kwargs)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return os.fspath(out)
