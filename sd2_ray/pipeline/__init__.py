"""``sd2 run``: the SD² pipeline with the paper's baselines (config, chained paths, run, report).

:mod:`~sd2_ray.pipeline.config` (the typed pipeline YAML), :mod:`~sd2_ray.pipeline.chain` (every
stage's config and output path, in one place), :mod:`~sd2_ray.pipeline.run` (the run, top to
bottom), :mod:`~sd2_ray.pipeline.report` (table, comparisons, plots).
"""
