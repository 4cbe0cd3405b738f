"""Test helpers for the serving layer: a tiny random target + drafter pair with a real
byte-level BPE tokenizer and chat template, saved as HF dirs in a second.

Random weights make acceptance meaningless (use the model kit for that) but exercise every
code path: tokenisation, chat template, batching, streaming, stop strings, errors.
"""

from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one. ",
    "Ray Serve batches concurrent requests so they share forward passes. ",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, letters: a b c d e f g h i j k l m n o p q r s t u v w x y z. ",
]


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIALS[3:],
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_pair(out_dir: str, max_positions: int = 256) -> tuple[str, str]:
    """``out_dir/target`` and ``out_dir/drafter`` (smaller, other seed), same tokenizer."""
    from sd2_ray.models.tiny import tiny_model

    tok = tiny_tokenizer()
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
