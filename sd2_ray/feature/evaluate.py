"""A feature head as the eval's drafter (pure: no Ray): its decoding engine and its drafting cost.

Drafting cost per draft token, in the report's terms (``drafter_macs_per_token``): the head's own
linear layers (fusion, its decoder layer, the partial-alignment projection, the EAGLE-3 reduction)
*plus the target's LM head*, which every draft step runs over the head's feature; attention is one
layer's. The target's features are free: the verification pass computes them anyway.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from sd2_ray.feature.head import FeatureHead, is_feature_head


def is_head_dir(path: str) -> bool:
    """Whether ``path`` (local or s3://) is a feature head's directory (its config alone is read)."""
    from sd2_ray.models.io import model_metadata_dir

    return is_feature_head(model_metadata_dir(path))


def head_macs(head: FeatureHead) -> dict[str, Any]:
    """:func:`sd2_ray.models.macs.linear_macs`'s report for a head, its LM head the target's."""
    from sd2_ray.models.macs import linear_macs

    own = linear_macs(head)
    lm_weight = cast(torch.Tensor, head.frozen.lm_head.weight)
    lm = {"in": int(lm_weight.shape[1]), "out": int(lm_weight.shape[0])}
    lm_macs = lm["in"] * lm["out"]
    dense, sparse = own["dense_macs"] + lm_macs, own["macs"] + lm_macs
    return {
        **own,
        "macs": sparse,
        "dense_macs": dense,
        "blocks_macs": own["macs"],
        "blocks_dense_macs": own["dense_macs"],
        "head_macs": lm_macs,
        "sparsity": 1.0 - sparse / dense,
        "layers": {**own["layers"], "target.lm_head": {**lm, "dense": lm_macs, "nonzero": lm_macs}},
    }


def head_engine(target, head_dir: str, num_speculative_tokens: int):
    """(the feature head's decoding engine over ``target``, the head's drafting MACs)."""
    from sd2_ray import storage
    from sd2_ray.feature.decode import FeatureSpecDecoder

    head = FeatureHead.load(storage.local_dir(head_dir), target)
    return FeatureSpecDecoder(target, head, num_speculative_tokens), head_macs(head)
