"""Speculative decoding evaluation: MAL, acceptance by position, MACs, predicted and measured speedup.

In-process entry points (no Ray) for tune and pipeline: :func:`sd2_ray.evaluate.core.evaluate_pair`
and :func:`sd2_ray.evaluate.core.measure_target_only` (measure the baseline once, reuse it).
"""
from sd2_ray.evaluate.core import evaluate_pair, measure_target_only, prepare_prompts  # noqa: F401
