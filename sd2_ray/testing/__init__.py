"""Helpers the test suite and the benchmarks share, in one place; nothing in the pipeline
imports this package.

- :mod:`~sd2_ray.testing.engine_pairs`: tiny tokenizers (char, BPE) and target/drafter pairs for
  the speculative engine and everything built on it.
- :mod:`~sd2_ray.testing.serve_pairs`: a tiny chat pair with a byte-level BPE tokenizer.
- :mod:`~sd2_ray.testing.toy`: a sparse toy drafter and distilled-style rows for fine-tuning.
- :mod:`~sd2_ray.testing.procs`: Ray worker processes of a session (tests that SIGKILL one).
- :mod:`~sd2_ray.testing.fake_cluster`: a multi-node Ray on this machine from a shipped cluster file
  (Ray's fake multi-node autoscaler).
"""
