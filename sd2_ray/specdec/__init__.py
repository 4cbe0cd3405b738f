"""Speculative decoding: lossless engine, target-only baseline, cross-tokenizer pairs."""
