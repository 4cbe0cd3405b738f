r"""Byte-level BPE tokenizers trained on the corpus, wrapped as transformers tokenizers with a
chat template.

The template is plain text markup (``<|user|>...<|end|>\n<|assistant|>``) whose tags are special
tokens; ``<|end|>`` closes a turn and is the EOS, so generation stops after an answer. A turn's
text follows its tag directly, with no newline: the generation prompt then ends on a special
token, so the answer's first token is the one the model saw in training (a trailing ``\n``
would be cut off from the indentation that byte-level BPE merges it with in training).
Both kit tokenizers use the same markup, so a prompt renders to identical text for the target
and the cross-tokenizer drafter. No BOS is added on encode: the template is all there is, so
nothing doubles when callers render then tokenize.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PAD, DOC, END = "<|pad|>", "<|endoftext|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, DOC, END, *ROLE_TOKENS]  # ids 0..5 in this order

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    min_frequency: int = 2,
    model_max_length: int | None = 1024,
):
    """A PreTrainedTokenizerFast with a byte-level BPE of ``vocab_size`` learned from ``texts``.

    ``special_tokens`` (ids 0.. in this order) are the pad, BOS and EOS tokens, then any others
    (additional special tokens); the defaults are the kit's. ``model_max_length`` None: unbounded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=special_tokens[0],
        bos_token=special_tokens[1],
        eos_token=special_tokens[2],
        unk_token=None,
        additional_special_tokens=list(special_tokens[3:]),
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tok.chat_template = chat_template
    return tok


def render_chat(tokenizer, prompt: str | list[dict[str, str]], response: str | None = None) -> str:
    """The conversation as text: the user turn (or the given messages), then the assistant turn
    (open if no response)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def token_stream(tokenizer, texts: Iterable[str], separator: str = DOC) -> list[int]:
    """All texts encoded and concatenated, each followed by the separator token."""
    sep = tokenizer.convert_tokens_to_ids(separator)
    ids: list[int] = []
    texts = list(texts)
    # the Rust tokenizer directly: no per-call length warnings, and it batches in parallel
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(sep)
    return ids
