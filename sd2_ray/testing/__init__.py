"""Helpers the test suite and the benchmarks share (tiny models, toy data, processes, ports).
Nothing in the pipeline imports this package."""
