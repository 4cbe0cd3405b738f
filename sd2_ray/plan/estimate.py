"""Per-GPU memory of each stage, estimated from the model shapes and the stage settings.

Model states under ZeRO come from DeepSpeed's own estimators; activations follow Korthikanti et
al. (arXiv 2205.05198) for a transformer layer in 16-bit, ``34·s·b·h`` bytes (their ``5·a·s²·b``
attention-score term is not held: transformers' SDPA / flash attention recompute it), with
activation checkpointing keeping one layer's worth plus each layer's input; the loss holds
``chunk × vocab`` fp32 logits (and their gradient) at a time. A fine-tune's sparsity masks
cost 1 bit per prunable weight (bit-packed on every GPU) plus one weight's mask unpacked while
its gradient is masked. Under ZeRO-3 each rank first loads the whole drafter in the training
dtype before ``deepspeed.initialize`` partitions it: the per-GPU need is the larger of that
load and the training peak. Pruning holds the fp32 model, every calibration sample's hidden
state (plus the one being replaced) and rotary tables, one block's Hessians and the widest
layer's fp64 SparseGPT workspace. vLLM needs its shard of the
weights plus KV cache for at least one full-length sequence, inside ``gpu_memory_utilization``.
Estimates are a plan, not a measurement: a margin (``OVERHEAD_GB``) covers CUDA context,
allocator fragmentation and kernels' workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd2_ray.plan.shapes import ModelShape

GB = 1e9
OVERHEAD_GB = 2.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass
class Need:
    """What one stage asks for: Ray resources per bundle, bundles, and GPU memory per GPU."""

    stage: str
    bundles: list[dict[str, float]]
    gpu_gb: dict[str, float] = field(default_factory=dict)  # breakdown, per GPU
    strategy: str = "PACK"  # STRICT_PACK: every bundle on one node
    note: str = ""
    usable_fraction: float = 1.0  # of a GPU's memory the stage may use (vLLM's gpu_memory_utilization)
    load_gb: float = 0.0  # a phase before the steady state (a ZeRO-3 rank loading the whole model)

    @property
    def per_gpu_gb(self) -> float:
        return max(sum(self.gpu_gb.values()), self.load_gb) + (OVERHEAD_GB if self.gpu_gb else 0.0)

    @property
    def gpus_per_bundle(self) -> float:
        return max((b.get("GPU", 0.0) for b in self.bundles), default=0.0)


def zero_states_gb(shape: ModelShape, stage: int, gpus: int, cpu_offload: bool) -> float:
    """Per-GPU bytes of parameters, gradients and Adam states under ZeRO-2/3 (DeepSpeed's estimator)."""
    load_estimators()
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.params,
            shape.largest_layer_params,
            num_gpus_per_node=gpus,
            num_nodes=1,
            cpu_offload=cpu_offload,
            cpu_offload_params=cpu_offload,
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            shape.params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=cpu_offload
        )
    return gpu / GB


def load_estimators() -> None:
    """Import DeepSpeed's ZeRO estimators leaving ``os.environ`` as it was. A plan runs in the
    driver before ``sd2 run`` starts Ray, and a local Ray hands the driver's environment to every
    worker: an accelerator named here (``DS_ACCELERATOR=cpu``, once set to silence DeepSpeed's
    detection warning) made GPU workers train on DeepSpeed's CPU accelerator. DeepSpeed's own
    import writes a variable too (``PYTORCH_NVML_BASED_CUDA_CHECK``); it is taken back."""
    import os

    before = dict(os.environ)
    try:
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def activations_gb(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Activations of one micro-batch kept for backward, in 16-bit."""
    s, b, h = seq_len, micro_batch, shape.hidden
    per_layer = 34 * s * b * h
    if checkpointing:
        return (shape.layers * 2 * s * b * h + per_layer) / GB
    return shape.layers * per_layer / GB


def logits_gb(shape: ModelShape, micro_batch: int, seq_len: int, chunk_tokens: int) -> float:
    """fp32 logits and their gradient for the positions the loss holds at once."""
    positions = min(micro_batch * seq_len, max(chunk_tokens, seq_len if chunk_tokens <= 0 else chunk_tokens))
    return 2 * positions * shape.vocab * 4 / GB


def training_dtype(settings) -> str:
    """The dtype a fine-tune computes (and loads its drafter) in, from its DeepSpeed overrides."""
    ds = settings.deepspeed or {}
    if (ds.get("bf16") or {}).get("enabled"):
        return "bfloat16"
    return "float16" if (ds.get("fp16") or {}).get("enabled") else "float32"


def masks_gb(shape: ModelShape) -> float:
    """Bit-packed masks of every prunable weight, plus the largest one unpacked (bool and the
    byte expansion) with its masked 16-bit gradient while its hook runs."""
    return (shape.prunable_params / 8 + 4 * shape.largest_prunable) / GB


def live_parameters(shape: ModelShape, settings) -> dict[str, float]:
    """ZeRO-3 keeps gathered parameters alive for reuse (the backward pass, a checkpointed
    block's recompute) up to ``stage3_max_live_parameters`` (DeepSpeed's default 1e9), in 16 bit,
    beyond the one layer its estimator counts."""
    if settings.zero_stage != 3:
        return {}
    zero = (settings.deepspeed or {}).get("zero_optimization") or {}
    live = min(float(zero.get("stage3_max_live_parameters", 1e9)), float(shape.params))
    return {"ZeRO-3 live gathered parameters": live * 2 / GB}


def finetune_need(shape: ModelShape, settings, stage: str = "finetune") -> Need:
    """A fine-tune's workers: ZeRO states, activations at the configured micro-batch, logits,
    masks; under ZeRO-3 at least the whole drafter loaded in the training dtype."""
    offload = bool(((settings.deepspeed or {}).get("zero_optimization") or {}).get("offload_optimizer"))
    gpus = settings.workers if settings.use_gpu else 0
    bundle = {"CPU": settings.cpus_per_worker, **({"GPU": 1.0} if settings.use_gpu else {})}
    need = Need(stage, [bundle] * settings.workers)
    if gpus:
        need.gpu_gb = {
            f"ZeRO-{settings.zero_stage} model states": zero_states_gb(shape, settings.zero_stage, gpus, offload),
            **live_parameters(shape, settings),
            "activations": activations_gb(
                shape, settings.micro_batch, settings.seq_len, settings.gradient_checkpointing
            ),
            "logits": logits_gb(shape, settings.micro_batch, settings.seq_len, settings.loss_chunk_tokens),
            "masks (1 bit per prunable weight)": masks_gb(shape),
        }
        dtype = training_dtype(settings)
        if settings.zero_stage == 3:  # ZeRO-2's states already hold the whole 16-bit model
            need.load_gb = weights_gb(shape, dtype) + masks_gb(shape)
        need.note = (
            f"{settings.workers} workers, micro-batch {settings.micro_batch} x {settings.seq_len} tokens, "
            f"checkpointing {'on' if settings.gradient_checkpointing else 'off'}, {dtype}"
            + (f"; {need.load_gb:.1f} GB while loading the whole model" if need.load_gb else "")
        )
    return need


def weights_gb(shape: ModelShape, dtype: str, shards: int = 1) -> float:
    return shape.params * DTYPE_BYTES.get(dtype, 2) / shards / GB


def vllm_need(
    stage: str,
    shape: ModelShape,
    tp: int,
    replicas: int,
    dtype: str,
    max_model_len: int,
    utilization: float,
    drafter: ModelShape | None = None,
) -> Need:
    """vLLM replicas at tensor parallelism ``tp`` (one node each): weights shard + KV for one
    full-length sequence must fit the memory vLLM is allowed to use."""
    need = Need(
        stage,
        [{"CPU": 1.0, "GPU": 1.0}] * tp,
        strategy="STRICT_PACK" if tp > 1 else "PACK",
        usable_fraction=utilization,
    )
    need.gpu_gb = {
        "weights (TP shard)": weights_gb(shape, dtype, tp),
        "KV cache, one max_model_len sequence": shape.kv_bytes_per_token(DTYPE_BYTES.get(dtype, 2))
        * max_model_len
        / tp
        / GB,
    }
    if drafter is not None:
        need.gpu_gb["draft model (on every shard)"] = weights_gb(drafter, dtype)
    need.note = (
        f"{replicas} replica(s) x TP {tp}, max_model_len {max_model_len}, gpu_memory_utilization {utilization:g}"
    )
    return need


def sharded_eval_need(
    stage: str, shape: ModelShape, drafter: ModelShape, gpus: float, dtype: str, batch: int, tokens: int
) -> Need:
    """A target spread over ``gpus`` GPUs by accelerate (plus the drafter on the first) with
    KV caches for ``batch`` sequences of ``tokens``."""
    n = max(1, int(gpus))
    bytes_ = DTYPE_BYTES.get(dtype, 2)
    need = Need(stage, [{"CPU": 1.0, "GPU": float(gpus)}] if gpus else [{"CPU": 1.0}])
    if gpus:
        need.gpu_gb = {
            "target weights (1/N)": weights_gb(shape, dtype, n),
            "drafter (first GPU)": weights_gb(drafter, dtype),
            "KV caches (1/N)": (shape.kv_bytes_per_token(bytes_) / n + drafter.kv_bytes_per_token(bytes_))
            * batch
            * tokens
            / GB,
        }
        need.note = f"target over {n} GPU(s), batch {batch} x {tokens} tokens"
    return need


def prune_need(stage: str, shape: ModelShape, settings, dtype: str = "float32") -> Need:
    """Pruning runs block by block on the model's device (sd2_ray/prune/sequential.py): the
    model (fp32), every calibration sample's hidden state entering the block plus the one being
    replaced (fp32), each sample's rotary cos/sin tables, one sample's pass through the block,
    the block's Hessians and the widest layer's SparseGPT workspace (fp64 inverse factor)."""
    need = Need(stage, [{"CPU": settings.num_cpus, **({"GPU": float(settings.num_gpus)} if settings.num_gpus else {})}])
    if settings.num_gpus:
        widest = max(shape.hidden, shape.intermediate)
        sample = settings.seq_len * shape.hidden * 4
        need.gpu_gb = {
            "model (fp32)": weights_gb(shape, dtype),
            "block inputs (+ one output)": (settings.num_samples + 1) * sample / GB,
            "rotary cos/sin per sample": settings.num_samples * 2 * settings.seq_len * shape.head_dim * 4 / GB,
            "one sample through a block": 17 * sample / GB,
            "Hessians of one block (fp32)": shape.block_hessian_elements() * 4 / GB,
            "SparseGPT workspace (widest layer, fp64)": (widest * widest * 8 * 2 + shape.largest_prunable * 4 * 2) / GB,
        }
    return need
