"""Speculative decoding evaluation: MAL, acceptance by position, MACs, predicted and measured speedup.

In-process entry points (no Ray) for tune and pipeline: :func:`sd2_ray.evaluate.core.evaluate_pair`
and :func:`sd2_ray.evaluate.core.measure_target_only` (measure the baseline once, reuse it).
"""

_CORE = ("evaluate_pair", "measure_target_only", "prepare_prompts")


def __getattr__(name: str):
    # Lazy: `sd2 --help` imports the eval config, which must not pull in torch.
    if name in _CORE:
        from sd2_ray.evaluate import core

        return getattr(core, name)
    raise AttributeError(name)
