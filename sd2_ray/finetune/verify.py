"""Re-verify the fine-tuned drafter's sparsity and carry the masks over to the output.

Independent of the training code path: the final weights are reloaded from the saved HF
dir and compared with the *input* model's masks, so a bug in the enforcement shows up here.
"""

from __future__ import annotations

import json
import logging
import os

from sd2_ray import storage
from sd2_ray.models.sparsity import (
    MASKS_FILE,
    SPARSITY_FILE,
    check_masks,
    load_masks,
    masked_weights_nonzero,
    read_report,
    sparsity_of,
)

log = logging.getLogger(__name__)


class SparsityLost(RuntimeError):
    """Masked weights came out nonzero although masks were enforced (a bug, not bad input)."""


def _input_masks(input_local: str, source: str) -> dict:
    """``input_local`` may hold only the input's metadata and masks; the weights (needed only
    to derive masks from zeros) are loaded from ``source``, the configured model path."""
    masks = load_masks(input_local)
    if masks or read_report(input_local) is None:
        return masks
    from sd2_ray.models.io import load_model

    return load_masks(input_local, load_model(source))  # derived from the input's zeros


def verify_sparsity(config, input_local: str, final_local: str) -> dict:
    """Check the final weights against the input masks; write masks + updated sparsity.json
    into ``config.output``. Returns the check as a dict for metrics.json."""
    from sd2_ray.models.io import load_model

    masks = _input_masks(input_local, config.model)
    if not masks:
        return {"masked_tensors": 0, "masked_weights": 0, "masked_nonzero": 0, "verified": True}
    model = load_model(final_local)
    check_masks(model, masks, source=final_local)
    nonzero = masked_weights_nonzero(model, masks)
    params = dict(model.named_parameters())
    layer_sparsity = {
        k[: -len(".weight")] if k.endswith(".weight") else k: sparsity_of(params[k].detach() != 0) for k in masks
    }
    masked = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((params[k].detach() == 0).sum()) for k in masks)
    check = {
        "masked_tensors": len(masks),
        "masked_weights": masked,
        "masked_nonzero": nonzero,
        "total_sparsity": zeros / total if total else 0.0,
        "verified": nonzero == 0,
    }
    _write_masks(config.output, input_local, masks, layer_sparsity, check)
    if nonzero and config.enforce_masks:
        raise SparsityLost(
            f"{config.output}: {nonzero} of {masked} masked weights are nonzero after "
            f"fine-tuning with enforce_masks=true"
        )
    log.info(
        "sparsity check: %d masked weights, %d nonzero, total sparsity %.4f", masked, nonzero, check["total_sparsity"]
    )
    return check


def _write_masks(output: str, input_local: str, masks: dict, layer_sparsity: dict, check: dict) -> None:
    mask_file = os.path.join(input_local, MASKS_FILE)
    if os.path.isfile(mask_file):
        with open(mask_file, "rb") as f:
            storage.write_bytes(storage.join(output, MASKS_FILE), f.read())
    else:  # masks were derived from zeros: store them explicitly for the next stage
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "masks.safetensors")
            save_file({k: v.contiguous() for k, v in masks.items()}, path)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(output, MASKS_FILE), f.read())
    report = read_report(input_local) or {}
    layers = report.get("layers") or {}
    for name, value in layer_sparsity.items():
        layers.setdefault(name, {})["sparsity"] = value
    report["layers"] = layers
    report["total_sparsity"] = check["total_sparsity"]
    report["finetune"] = {k: check[k] for k in ("masked_weights", "masked_nonzero", "verified")}
    storage.write_text(storage.join(output, SPARSITY_FILE), json.dumps(report, indent=2) + "\n")
