"""Tiny tokenizers and model pairs for tests of the engine (and of anything built on it).

- :func:`char_tokenizer`: one token per character (order selectable), fast tokenizer.
- :func:`bpe_tokenizer`: characters plus a few merges, so token boundaries differ from chars.
- :func:`permuted_copy`: the same network with its vocabulary rows permuted: as a drafter with
  the permuted tokenizer it computes the target's exact distribution in *text* space, so a
  correct cross-tokenizer bridge must accept everything.
- :func:`tiny_pair_dirs`: saved target/drafter dirs with tokenizers (for CLI and eval tests).
"""

from __future__ import annotations

import copy
import random

import torch

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny configs' pad, bos, eos
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-+*/=<>\n"
MERGES = [
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
]


def _fast(model, eos: bool = True):
    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>" if eos else None
    )


def char_tokenizer(seed: int | None = None):
    """One token per character; ``seed`` shuffles the id order of the characters."""
    from tokenizers.models import BPE

    chars = list(CHARS)
    if seed is not None:
        random.Random(seed).shuffle(chars)
    vocab = {s: i for i, s in enumerate(SPECIALS + chars)}
    return _fast(BPE(vocab=vocab, merges=[]))


def bpe_tokenizer():
    """Characters plus merges: multi-character tokens, so re-tokenization is non-trivial."""
    from tokenizers.models import BPE

    pieces = SPECIALS + list(CHARS) + ["".join(m) for m in MERGES]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(pieces))}
    return _fast(BPE(vocab=vocab, merges=MERGES))


def permuted_copy(model, source_tok, dest_tok):
    """``model`` re-indexed to ``dest_tok``'s ids: dest id d gets the rows of the source id with
    the same token string. Both tokenizers must have the same token strings."""
    src_vocab, dest_vocab = source_tok.get_vocab(), dest_tok.get_vocab()
    index = torch.tensor([src_vocab[s] for s, _ in sorted(dest_vocab.items(), key=lambda kv: kv[1])])
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in (clone.get_input_embeddings(), clone.get_output_embeddings()):
            module.weight.copy_(module.weight[index])
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias.copy_(bias[index])
    return clone.eval()


def noisy_copy(model, scale: float, seed: int = 7):
    """A drafter that agrees with ``model`` often but not always (acceptance varies by row)."""
    import copy

    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return clone.eval()


def sharpen(model, factor: float = 8.0):
    """Scale the LM head so a random model's next-token distributions are peaked, not uniform."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def tiny_pair_dirs(
    out_dir: str, arch: str = "llama", drafter_arch: str | None = None, cross_tokenizer: bool = False
) -> tuple[str, str]:
    """Save a tiny target (char tokenizer) and a smaller drafter (same or BPE tokenizer)."""
    import os

    from sd2_ray.models.tiny import tiny_model

    t_tok = char_tokenizer()
    d_tok = bpe_tokenizer() if cross_tokenizer else t_tok
    target = sharpen(tiny_model(arch, seed=0, vocab_size=len(t_tok)))
    drafter = sharpen(tiny_model(drafter_arch or arch, seed=1, vocab_size=len(d_tok), layers=1))
    paths = []
    for name, model, tok in (("target", target, t_tok), ("drafter", drafter, d_tok)):
        path = os.path.join(out_dir, name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
