"""Check a pruned model dir against its own masks and sparsity report."""

from __future__ import annotations

from typing import Any

from sd2_ray.errors import DataError


def verify_pruned(model_dir: str, model=None) -> dict[str, Any]:
    """Load (unless given) the model of a pruned dir and check it against its masks file
    and ``sparsity.json``; returns the report, raises :class:`DataError` naming the first problem."""
    from sd2_ray.models.io import load_model, resolve_model_dir
    from sd2_ray.models.sparsity import MASKS_FILE, load_masks, read_report, sparsity_problems

    local = resolve_model_dir(model_dir)
    report = read_report(local)
    if report is None:
        raise DataError(f"{model_dir}: no sparsity.json (not a pruned model dir)")
    model = model if model is not None else load_model(local)
    masks = load_masks(local, model)
    if not masks:
        raise DataError(f"{model_dir}: no masks ({MASKS_FILE} missing and no layers in sparsity.json)")
    problems = sparsity_problems(model, masks, report)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{model_dir}: {problems[0]}{more}")
    return report
