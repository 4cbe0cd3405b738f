"""Test helpers for the serving layer: a tiny random target + drafter pair with a real
byte-level BPE tokenizer and chat template (:func:`sd2_ray.testing.tokenizer.chat_bpe_tokenizer`),
saved as HF dirs in a second.

Random weights make acceptance meaningless (use the model kit for that) but exercise every
code path: tokenisation, chat template, batching, streaming, stop strings, errors.
"""

from __future__ import annotations

import os


def save_tiny_pair(out_dir: str, max_positions: int = 256) -> tuple[str, str]:
    """``out_dir/target`` and ``out_dir/drafter`` (smaller, other seed), same tokenizer."""
    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import chat_bpe_tokenizer

    tok = chat_bpe_tokenizer()
    vocab = len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    paths = []
    for name, seed, layers in (("target", 0, 2), ("drafter", 1, 1)):
        model = tiny_model("llama", seed=seed, vocab_size=vocab, layers=layers, max_positions=max_positions)
        for key, value in ids.items():
            setattr(model.config, key, value)
            setattr(model.generation_config, key, value)
        path = os.path.join(out_dir, name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
