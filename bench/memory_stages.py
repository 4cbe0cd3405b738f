"""The device smoke's memory stages (bench/gpu_smoke.py): a Llama-3.2-3B-shaped drafter
fine-tuned as the GPU configs do, and SparseGPT over one 3B-width block, each peak measured
with ``torch.cuda.max_memory_allocated`` against what ``sd2 plan`` estimates for the same
settings (its ``OVERHEAD_GB`` margin left out: CUDA context and fragmentation are not
allocations). Under ``--cpu`` both run at a tiny shape to exercise the code, unmeasured."""

from __future__ import annotations

from types import SimpleNamespace

TOLERANCE = 0.15
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)


def _shape_fields(cpu: bool, layers: int | None = None) -> dict:
    from sd2_ray.plan.shapes import KNOWN

    fields = dict(TINY if cpu else KNOWN["llama-3.2-3b"])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return fields


def _random_llama(fields: dict, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):  # built where it trains, in its dtype: as the worker loads it
        return AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=dtype)


def _half_masks(model) -> dict:
    """Random 50 % keep-masks of the decoder blocks' linear weights, bit-packed; weights zeroed."""
    import torch

    from sd2_ray.finetune.masking import PackedMask
    from sd2_ray.testing.toy import decoder_linear_names

    modules, masks = dict(model.named_modules()), {}
    with torch.no_grad():
        for name in decoder_linear_names(model):
            weight = modules[name].weight
            keep = torch.rand(weight.shape, device=weight.device) >= 0.5
            weight.mul_(keep)
            masks[f"{name}.weight"] = PackedMask.of(keep)
    return masks


def _long_rows(n: int, words: int) -> list[dict]:
    from sd2_ray.testing.toy import WORDS

    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return [{"id": f"long-{i}", "prompt": f"recite {i}", "response": text} for i in range(n)]


def _measure(cpu: bool) -> tuple[float | None, float | None]:
    if cpu:
        return None, None
    import torch

    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def _reset(cpu: bool) -> float:
    import gc

    gc.collect()
    if cpu:
        return 0.0
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 1e9


def _compare(out: dict, measured: float | None, planned: float) -> dict:
    out["plan_gb_without_overhead"] = round(planned, 2)
    if measured is None:
        return dict(out, checks={"ran (unmeasured at the tiny --cpu shape)": True})
    out["measured_over_plan"] = round(measured / planned, 3)
    return dict(out, checks={f"within {TOLERANCE:.0%} of the plan": abs(measured / planned - 1) <= TOLERANCE})


def memory_3b(args) -> dict:
    """Three ZeRO-3 bf16 steps of micro-batch 2 x seq 2048 with 50 % masks at world size 1."""
    import torch
    from gpu_smoke import init_distributed

    from sd2_ray.finetune import masking, session
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.step import train_step
    from sd2_ray.finetune.worker_config import worker_config
    from sd2_ray.plan.estimate import OVERHEAD_GB, finetune_need
    from sd2_ray.plan.shapes import shape_from_config
    from sd2_ray.testing.tokenizer import toy_tokenizer

    fields, seq = _shape_fields(args.cpu), 128 if args.cpu else 2048
    device = "cpu" if args.cpu else "cuda"
    config = FinetuneConfig(
        model=args.out,
        data=args.out,
        output=args.out + "/3b",
        workers=1,
        zero_stage=3,
        batch_size=2,
        seq_len=seq,
        gradient_checkpointing=True,
        use_gpu=not args.cpu,
        use_response_ids=False,
        deepspeed={"bf16": {"enabled": True}},
    )
    init_distributed(args.cpu)
    base = _reset(args.cpu)
    model = _random_llama(fields, device, torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    masks = _half_masks(model)
    masking.register_gradient_masks(model, masks)
    worker = worker_config(config, total_steps=3)
    engine, _ = session.build_engine(model, worker)
    tokenizer, rows = toy_tokenizer(), _long_rows(2, seq)  # ~6 characters a word: every row fills seq_len
    losses = [train_step(engine, rows, tokenizer, worker, 0, 1)["loss"] for _ in range(3)]
    allocated, reserved = _measure(args.cpu)
    need = finetune_need(shape_from_config(fields, "smoke"), config)
    nonzero = masking.count_masked_nonzero(engine.module.lm, masks)
    out = {
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        "losses": losses,
        "masked_nonzero": nonzero,
        "baseline_allocated_gb": base,
        "max_allocated_gb": allocated,
        "max_reserved_gb": reserved,
        "plan_gb": round(need.per_gpu_gb, 2),
        "plan_breakdown": {k: round(v, 3) for k, v in need.gpu_gb.items()},
        "plan_load_gb": need.load_gb,
    }
    del engine, model
    out = _compare(out, None if allocated is None else allocated - base, need.per_gpu_gb - OVERHEAD_GB)
    out["checks"]["masked weights zero"] = nonzero == 0
    return out


def sparsegpt_3b(args) -> dict:
    """SparseGPT of one decoder block at 3B widths (fp32, as the prune stage loads it)."""
    import torch

    from sd2_ray.plan.estimate import OVERHEAD_GB, prune_need
    from sd2_ray.plan.shapes import shape_from_config
    from sd2_ray.prune.sequential import prune_model

    fields = _shape_fields(args.cpu, layers=1)
    samples, seq = (4, 64) if args.cpu else (args.prune_samples, 2048)
    device = "cpu" if args.cpu else "cuda"
    base = _reset(args.cpu)
    model = _random_llama(fields, device, torch.float32).eval()
    batches = [torch.randint(0, fields["vocab_size"], (1, seq)) for _ in range(samples)]
    config = SimpleNamespace(
        method="sparsegpt",
        targets=["re:.*layers.*proj"],
        ignore=[],
        nm=None,
        target_sparsity=0.5,
        block_size=128,
        dampening=0.01,
        pattern="unstructured",
    )
    with torch.no_grad():
        _, masks, report = prune_model(model, batches, config)
    allocated, reserved = _measure(args.cpu)
    settings = SimpleNamespace(num_cpus=1, num_gpus=1, num_samples=samples, seq_len=seq)
    need = prune_need("prune", shape_from_config(fields, "smoke"), settings)
    out = {
        "samples": samples,
        "seq_len": seq,
        "total_sparsity": report["total_sparsity"],
        "baseline_allocated_gb": base,
        "max_allocated_gb": allocated,
        "max_reserved_gb": reserved,
        "plan_gb": round(need.per_gpu_gb, 2),
        "plan_breakdown": {k: round(v, 3) for k, v in need.gpu_gb.items()},
    }
    del model
    return _compare(out, None if allocated is None else allocated - base, need.per_gpu_gb - OVERHEAD_GB)
