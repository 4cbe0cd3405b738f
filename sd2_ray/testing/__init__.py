"""Helpers the test suite and the benchmarks share, in one place; nothing in the pipeline
imports this package.

- :mod:`~sd2_ray.testing.tiny`: random tiny models (Llama, Qwen2, GPT-NeoX), built in milliseconds.
- :mod:`~sd2_ray.testing.tokenizer`: the one tokenizer builder (fixed character/BPE vocabularies,
  or a byte-level BPE trained by the kit's trainer) and the presets the tests share.
- :mod:`~sd2_ray.testing.engine_pairs`: target/drafter pairs for the speculative engine and
  everything built on it.
- :mod:`~sd2_ray.testing.serve_pairs`: a tiny chat pair with a byte-level BPE tokenizer.
- :mod:`~sd2_ray.testing.toy`: a sparse toy drafter and distilled-style rows for fine-tuning.
- :mod:`~sd2_ray.testing.calibration`: calibration rows and a saved tiny model for pruning.
- :mod:`~sd2_ray.testing.fake_cluster`: a multi-node Ray on this machine from a shipped cluster file
  (Ray's fake multi-node autoscaler).
- :mod:`~sd2_ray.testing.serve_load`, :mod:`~sd2_ray.testing.zero_ranks`: load generation against
  Serve, and ZeRO-3 restore scenarios.

Killing Ray worker processes (SIGKILL) is no part of the package: see ``tests/_ray_procs.py``.
"""
