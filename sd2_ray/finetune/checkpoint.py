"""A drafter rebuilt from an intermediate fine-tuning checkpoint (pure: DeepSpeed + torch).

The loop saves DeepSpeed's ZeRO files (tag ``ds``) at intermediate steps, around the loss
module whose ``lm`` is the drafter (:class:`sd2_ray.finetune.loss_module.CausalLMLoss`). DeepSpeed's
own converter merges the ranks' partitions into one fp32 state dict (ZeRO-2 and ZeRO-3); the
drafter's masks are re-applied (they already hold: gradients are masked) as cheap insurance.
"""

from __future__ import annotations

DS_TAG = "ds"  # DeepSpeed's tag of the intermediate checkpoints
FINAL_CHECKPOINT = "final"  # the last checkpoint's directory: the HF model dir + train state
MODEL_SUBDIR = "model"  # the HF model dir inside the final checkpoint
LM_PREFIX = "lm."


def checkpoint_dir_name(step: int) -> str:
    """The storage directory of the intermediate checkpoint saved after optimizer step ``step``."""
    return f"step-{step:07d}"


def drafter_from_checkpoint(directory: str, drafter_dir: str):
    """The drafter of ``drafter_dir`` (its architecture, masks and tokenizer) with the weights of
    the DeepSpeed checkpoint in ``directory``; (model in eval mode, tokenizer)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.models.sparsity import apply_masks, load_masks

    state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=DS_TAG)
    state = {k[len(LM_PREFIX) :] if k.startswith(LM_PREFIX) else k: v for k, v in state.items()}
    drafter = load_model(drafter_dir)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(drafter.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the drafter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    apply_masks(drafter, load_masks(drafter_dir, drafter))
    return drafter.eval(), load_tokenizer(drafter_dir)
