"""The one builder of the tokenizers tests and benchmarks use, and the presets they share.

:func:`build_tokenizer` makes every one of them, in one of two ways:

- a fixed vocabulary (``pieces``): ids are the special tokens, then the pieces (``seed``
  shuffles their order), then the pieces ``merges`` make; a BPE over it, so with no merges one
  token per character (unknown characters map to ``unk_token``, or are dropped without one);
- trained (``corpus``): a byte-level BPE learned from the corpus by the model kit's own trainer
  (:func:`sd2_ray.kit.tokenizer.train_tokenizer`), with these special tokens and template.

``specials`` are the pad, BOS and EOS tokens (ids 0, 1, 2: the tiny configs' pad, bos, eos; see
:mod:`sd2_ray.testing.tiny`), then any others. Presets:

- :func:`char_tokenizer`: one token per character of :data:`CHARS`, no chat template (the engine's
  tests; ``seed`` permutes the ids, for cross-tokenizer checks with identical strings).
- :func:`bpe_tokenizer`: the same characters plus a few merges, so token boundaries differ.
- :func:`toy_tokenizer`: one token per character of :data:`TOY_CHARS` with ``<unk>`` and a
  ``role: content`` chat template (fine-tuning's toy rows).
- :func:`ascii_tokenizer`: printable ASCII filling the tiny models' 96 ids exactly, with a chat
  template that starts with BOS (pruning's calibration rows).
- :func:`chat_bpe_tokenizer`: a trained byte-level BPE with role tokens (the serving layer).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence

SPECIALS = ("<pad>", "<s>", "</s>")
UNK = "<unk>"

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-+*/=<>\n"
MERGES = (
    ("t", "h"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    (" ", "t"),
    ("o", "n"),
    ("r", "e"),
    ("e", "s"),
    (" ", "a"),
    ("th", "e"),
    (" t", "he"),
)

TOY_CHARS = " \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,:?!'-()"
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

ASCII_CHARS = "".join(chr(c) for c in range(32, 32 + 92))  # 4 specials + 92 = 96 ids, the tiny vocab
ASCII_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)

CHAT_SPECIALS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. ",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one. ",
    "Ray Serve batches concurrent requests so they share forward passes. ",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, letters: a b c d e f g h i j k l m n o p q r s t u v w x y z. ",
)


def build_tokenizer(
    pieces: Iterable[str] | None = None,
    *,
    specials: Sequence[str] = SPECIALS,
    unk_token: str | None = None,
    merges: Sequence[tuple[str, str]] = (),
    seed: int | None = None,
    chat_template: str | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 320,
    min_frequency: int = 0,
    model_max_length: int | None = None,
):
    """A ``PreTrainedTokenizerFast``: a fixed vocabulary of ``pieces`` or, given ``corpus``, a
    byte-level BPE of ``vocab_size`` trained on it (see the module docstring)."""
    if (pieces is None) == (corpus is None):
        raise ValueError("give exactly one of pieces (a fixed vocabulary) and corpus (a trained one)")
    if corpus is not None:
        from sd2_ray.kit.tokenizer import train_tokenizer

        tok = train_tokenizer(
            corpus,
            vocab_size,
            special_tokens=specials,
            chat_template=chat_template or "",
            min_frequency=min_frequency,
            model_max_length=model_max_length,
        )
        tok.chat_template = chat_template
        return tok
    assert pieces is not None  # for mypy: checked above
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*specials, *([unk_token] if unk_token else [])]))
    ordered = list(pieces)
    if seed is not None:
        random.Random(seed).shuffle(ordered)
    vocab = {s: i for i, s in enumerate(dict.fromkeys(specials + ordered + ["".join(m) for m in merges]))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=unk_token))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    others = [s for s in specials[3:] if s != unk_token]
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=specials[0],
        bos_token=specials[1],
        eos_token=specials[2],
        unk_token=unk_token,
        additional_special_tokens=others,
        chat_template=chat_template,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )


def char_tokenizer(seed: int | None = None):
    """One token per character of :data:`CHARS`; ``seed`` shuffles the characters' ids."""
    return build_tokenizer(CHARS, seed=seed)


def bpe_tokenizer():
    """Characters plus merges: multi-character tokens, so re-tokenization is non-trivial."""
    return build_tokenizer(CHARS, merges=MERGES)


def toy_tokenizer():
    """One token per character of :data:`TOY_CHARS`, ``<unk>`` and a ``role: content`` template."""
    return build_tokenizer(TOY_CHARS, unk_token=UNK, chat_template=TOY_CHAT_TEMPLATE)


def ascii_tokenizer():
    """One token per printable ASCII character, 96 ids in all (the tiny models' vocabulary)."""
    return build_tokenizer(ASCII_CHARS, unk_token=UNK, chat_template=ASCII_CHAT_TEMPLATE)


def chat_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on a small corpus, with role tokens and a chat template."""
    return build_tokenizer(
        corpus=list(CHAT_CORPUS) * 20,
        vocab_size=vocab_size,
        specials=CHAT_SPECIALS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
