"""The kit's models and their training: plain torch AdamW over random windows of token streams.

Shapes are chosen for vLLM's CPU backend too (head_dim 64, a standard attention head size).
Everything is seeded and runs on a fixed number of threads, so a seed gives identical weights.
"""

from __future__ import annotations

import logging
import math

import torch

from sd2_ray.kit.shapes import MAX_POSITIONS, Shape

log = logging.getLogger(__name__)


def build_model(shape: Shape, tokenizer, seed: int):
    """A freshly initialised causal LM of ``shape`` for ``tokenizer`` (tied embeddings)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    config = LlamaConfig(**common) if shape.arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class WindowSampler:
    """Random fixed-length windows from token streams, each batch mixing streams by a share."""

    def __init__(self, streams: list[list[int]], shares: list[float], seq_len: int, batch_size: int, seed: int):
        self.streams = [torch.tensor(s, dtype=torch.long) for s in streams]
        for s in self.streams:
            if len(s) <= seq_len:
                raise ValueError(f"a token stream of {len(s)} tokens is shorter than seq_len {seq_len}")
        counts = [round(share * batch_size) for share in shares]
        counts[0] = batch_size - sum(counts[1:])  # the first stream takes the remainder
        self.counts, self.seq_len = counts, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        for stream, count in zip(self.streams, self.counts, strict=True):
            starts = torch.randint(0, len(stream) - self.seq_len, (count,), generator=self.gen)
            rows.extend(stream[s : s + self.seq_len] for s in starts.tolist())
        return torch.stack(rows)


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, sampler: WindowSampler, steps: int, lr: float, name: str) -> list[float]:
    """AdamW with warmup + cosine decay and grad clipping; returns the per-step losses."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"kit: train {name}", unit="step", leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        ids = sampler.batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    log.info("trained %s: %d steps, final loss %.3f", name, steps, sum(losses[-10:]) / len(losses[-10:]))
    return losses


@torch.no_grad()
def heldout_loss(model, stream: list[int], seq_len: int, windows: int) -> float:
    """Mean next-token loss over up to ``windows`` evenly spaced, non-overlapping windows."""
    data = torch.tensor(stream, dtype=torch.long)
    n = min(windows, len(data) // seq_len)
    if n == 0:
        raise ValueError("held-out stream shorter than one window")
    stride = len(data) // n
    batch = torch.stack([data[i * stride : i * stride + seq_len] for i in range(n)])
    total = 0.0
    for chunk in batch.split(8):
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return total / n


@torch.no_grad()
def response_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean next-token loss on the reference answers' tokens only (the end-of-turn token
    included), each conditioned on its rendered prompt: how well the model answers the task,
    comparable with ln(vocab), a uniform guess."""
    from sd2_ray.kit.tokenizer import render_chat

    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer(render_chat(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"]
        full = tokenizer(render_chat(tokenizer, row["messages"], row["response"]), add_special_tokens=False)[
            "input_ids"
        ]
        labels = torch.tensor([-100] * len(prompt) + full[len(prompt) :])
        out = model(input_ids=torch.tensor([full]), labels=labels[None])
        answered = int((labels[1:] != -100).sum())
        total += out.loss.item() * answered
        count += answered
    return total / count if count else float("nan")
