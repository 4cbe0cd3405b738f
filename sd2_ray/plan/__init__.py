"""``sd2 plan``: the Ray resources and per-GPU memory each stage of a pipeline needs, checked
against a cluster's node types before anything is launched (pure: no Ray, no GPU)."""
