"""A sparse drafter's directory is what vLLM serves: with no index file vLLM loads every
``*.safetensors`` file at its top as weights, so the sparsity masks must live elsewhere (they
once sat there as ``masks.safetensors`` and worked only because they sorted first and were
overwritten). The pruned dir and the fine-tuned dir hold exactly the model's tensors at their top,
and the stages still find the masks."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from sd2_ray import cli
from sd2_ray.testing.calibration import save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def top_level_tensors(model_dir: str) -> list[tuple[str, str]]:
    """(name, dtype) of every tensor vLLM's loader reads from a dir without an index: all the
    top-level ``*.safetensors`` files, a name that two files hold counted twice (the masks bear
    their weights' names)."""
    from safetensors import safe_open

    tensors = []
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            tensors += [(name, str(f.get_slice(name).get_dtype())) for name in f.keys()]
    return sorted(tensors)


def model_keys(model_dir: str) -> list[tuple[str, str]]:
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    return sorted((k, names[v.dtype]) for k, v in state.items())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = save_tiny("llama", str(root / "tiny"), layers=2)
    out = str(root / "pruned")
    assert cli.main(["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.5", "--output", out]) == 0
    return out


def test_a_pruned_dir_holds_the_models_tensors_and_nothing_else_at_its_top(pruned):
    from sd2_ray.models.sparsity import load_masks
    from sd2_ray.prune.verify import verify_pruned

    assert top_level_tensors(pruned) == model_keys(pruned)
    masks = load_masks(pruned)
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    verify_pruned(pruned)  # the masks are still found and still hold


def test_a_fine_tuned_dir_holds_the_models_tensors_and_carries_the_masks(pruned, tmp_path):
    """What ``sd2 finetune`` publishes (the trained model, then the input's masks and report)."""
    from transformers import AutoModelForCausalLM

    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.verify import verify_sparsity
    from sd2_ray.models.sparsity import load_masks

    final = str(tmp_path / "final")  # a checkpoint's model: weights and config only
    AutoModelForCausalLM.from_pretrained(pruned).save_pretrained(final)
    out = str(tmp_path / "drafter")
    shutil.copytree(final, out)
    config = FinetuneConfig(model=pruned, data=str(tmp_path / "unused"), output=out, workers=1)
    check = verify_sparsity(config, pruned, final)
    assert check["verified"] and check["masked_tensors"]
    assert top_level_tensors(out) == model_keys(out)
    carried, original = load_masks(out), load_masks(pruned)
    assert carried.keys() == original.keys() and all(torch.equal(carried[k], original[k]) for k in carried)


def test_a_metadata_copy_brings_the_masks_but_no_weights(pruned):
    """The fine-tune's driver reads the masks from a metadata copy of the model dir."""
    import fnmatch

    from sd2_ray.models.io import METADATA_FILES
    from sd2_ray.models.sparsity import MASKS_FILE

    rels = [
        os.path.relpath(p, pruned)
        for p in glob.glob(os.path.join(pruned, "**", "*"), recursive=True)
        if os.path.isfile(p)
    ]
    fetched = [r for r in rels if any(fnmatch.fnmatchcase(r, p) for p in METADATA_FILES + (MASKS_FILE,))]
    assert MASKS_FILE in fetched and not any(r.endswith("model.safetensors") for r in fetched)
