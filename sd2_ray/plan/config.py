"""Config of ``sd2 plan``: which run to plan, on which cluster."""

from __future__ import annotations

from pydantic import Field

from sd2_ray.config import StageConfig, StoragePath


class PlanConfig(StageConfig):
    """Plan a run on a cluster before launching it: for every stage, the Ray resources it will
    request and an estimate of each GPU's memory (weights; ZeRO-2/3 model states from DeepSpeed's
    estimators; activations with and without checkpointing at the configured micro-batch and
    seq_len; logits; vLLM weights + KV cache per tensor-parallel shard), checked against the
    cluster's node types. Exits 2 naming the first stage that cannot fit.

        sd2 plan --config jobs/configs/llama70b_to_llama3b.yaml --cluster clusters/aws-gpu.yaml
        sd2 plan --config jobs/configs/gpu-tune.yaml            (a search: its trials' stages)
    """

    config: StoragePath = Field(..., description="the pipeline YAML (`sd2 run`) or search YAML (`sd2 tune`) to plan")
    cluster: StoragePath | None = Field(
        None,
        description="Ray cluster launcher YAML or KubeRay manifest (default: the planned config's own `cluster` field)",
    )
