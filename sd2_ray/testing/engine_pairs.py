"""Model pairs for tests of the engine (and of anything built on it); their tokenizers are
:mod:`sd2_ray.testing.tokenizer`'s ``char_tokenizer`` and ``bpe_tokenizer``.

- :func:`permuted_copy`: the same network with its vocabulary rows permuted: as a drafter with
  the permuted tokenizer it computes the target's exact distribution in *text* space, so a
  correct cross-tokenizer bridge must accept everything.
- :func:`tiny_pair_dirs`: saved target/drafter dirs with tokenizers (for CLI and eval tests).
- :func:`hf_greedy`: the reference every lossless greedy decoder is compared with.
"""

from __future__ import annotations

import copy

import torch


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


def hf_greedy(model, prompt: list[int], n: int, eos: int | None = 2, **inputs) -> list[int]:
    """The target's own greedy continuation of one prompt (HF ``generate``, batch 1, no padding);
    ``inputs``: more model inputs (a LLaVA model's ``pixel_values``)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            **inputs,
        )
    return out[0, len(prompt) :].tolist()


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

    from sd2_ray.testing.tiny import tiny_model
    from sd2_ray.testing.tokenizer import bpe_tokenizer, char_tokenizer

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
