"""Token-level conventions every stage shares: how a rendered prompt becomes ids, and which ids
end a response. One home each, so distillation, pruning calibration, fine-tuning, eval and
serving tokenize the same text into the same ids."""

from __future__ import annotations

from typing import Any


def encode_rendered(text: str, tokenizer) -> list[int]:
    """Token ids of a prompt rendered by :func:`sd2_ray.rows.render_prompt`. A chat template
    already writes the special tokens it wants (BOS included): adding them again would double
    the BOS, so special tokens are added only for tokenizers without a template."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def eos_token_ids(*sources: Any) -> list[int]:
    """Every id that ends a response, from any of: a generation config, a model config, a model
    (its generation config and config) or a tokenizer; sorted, without duplicates."""
    ids: set[int] = set()
    for source in sources:
        if source is None:
            continue
        for holder in (getattr(source, "generation_config", None), getattr(source, "config", None), source):
            value = getattr(holder, "eos_token_id", None) if holder is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value if v is not None)
    return sorted(ids)


def tokenizer_identity(tokenizer, name: str | None = None) -> dict[str, Any]:
    """What makes token ids mean the same text: a SHA-256 of the vocabulary (token -> id), with
    its size and a name for people. Two tokenizers with the same fingerprint give every id the
    same token, so ids written with one train the other. Special-token roles are left out: a base
    and an instruct model of one family name a different EOS over the same vocabulary."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    label = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": str(label), "vocab_size": len(vocab), "fingerprint": digest.hexdigest()}
