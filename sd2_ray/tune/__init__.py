"""Ray Tune (ASHA) search over pruning sparsity x fine-tuning learning rate, scored by measured
acceptance (MAL) and counted draft cost (MACs): ``sd2 tune``.

Pure pieces (no Ray): :mod:`~sd2_ray.tune.config`, :mod:`~sd2_ray.tune.space`,
:mod:`~sd2_ray.tune.report`. Ray adapters: :mod:`~sd2_ray.tune.trial` (one trial: prune ->
TorchTrainer fine-tune -> eval), :mod:`~sd2_ray.tune.driver` (Tuner + ASHA + restore),
:mod:`~sd2_ray.tune.job` (``main``).
"""
