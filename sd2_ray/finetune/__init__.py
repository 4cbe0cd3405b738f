"""Masked sparse fine-tuning: pure data/masking pieces, the per-worker loop, the Ray Train adapter."""
