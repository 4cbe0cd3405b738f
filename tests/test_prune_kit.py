"""Pruning quality on the model kit (trained models): held-out perplexity per method, one layer's
reconstruction error. Numbers seen (threads=1, 64 calibration rows x 256 tokens, 64 held-out rows):

    kit drafter, 10 blocks x 64 wide, 1600 training steps (kit b8edb64384f06f3d): dense 96.59
        50 %: sparsegpt 103.44, wanda 103.87, magnitude 106.73
        70 %: sparsegpt 151.90, wanda 265.42, magnitude 241.70
    kit target, 600 steps (same kit): dense 21.93 (slow suite: SparseGPT best at both levels)
        50 %: sparsegpt 21.99, wanda 22.17, magnitude 22.19
        70 %: sparsegpt 22.68, wanda 24.32, magnitude 24.28

The deep, narrow, longer-pretrained drafter has knowledge to lose (the point of the kit's shape):
50 % costs SparseGPT 7 % perplexity, so the test asserts SparseGPT within 10 % of dense and best of
the three at 50 %, and well ahead (>= 2 % better than the better of Wanda and magnitude) at 70 %.
Wanda vs magnitude is not asserted: at 70 % Wanda is the worse of the two on this drafter (265 vs
242), at 50 % they are within 3 %.

Earlier kits: the 2-block, 128-wide drafter trained 160 steps (dense 268.99) barely noticed
pruning at 50 % (every method within 1.7 % of dense; SparseGPT 269.91) and ordered SparseGPT <=
Wanda <= magnitude at 70 % (270.55, 290.62, 326.45); a 40-step drafter showed Wanda and magnitude
within 0.2 % in either order (undertrained models have no outlier input features, which is where
Wanda's |W|*||X|| departs from |W|).
"""

from __future__ import annotations

import pytest
import torch

from sd2_ray.models.io import load_model, load_tokenizer
from sd2_ray.prune.calibration import load_calibration, load_rows, render_sample, tokenize_samples
from sd2_ray.prune.config import PruneConfig
from sd2_ray.prune.magnitude import magnitude_prune
from sd2_ray.prune.quality import perplexity, reconstruction_error
from sd2_ray.prune.sequential import prune_model
from sd2_ray.prune.sparsegpt import Hessian, sparsegpt_prune
from sd2_ray.prune.wanda import InputNorms, wanda_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def kit_data(kit_dir, part, num_samples=64):
    from sd2_ray.kit import kit_paths

    paths = kit_paths(kit_dir)
    tok = load_tokenizer(paths[part])
    calib, _ = load_calibration(paths["train_prompts"], tok, num_samples, 256)
    held_out = tokenize_samples([render_sample(r, tok) for r in load_rows(paths["eval_prompts"], 64, seed=1)], tok, 256)
    return paths[part], calib, held_out


def perplexities(model_dir, calib, held_out, sparsity):
    out = {"dense": perplexity(load_model(model_dir), held_out)}
    for method in ("sparsegpt", "wanda", "magnitude"):
        cfg = PruneConfig(model="-", output="-", calibration="-", method=method, sparsity=sparsity)
        model, _, _ = prune_model(load_model(model_dir), calib, cfg)
        out[method] = perplexity(model, held_out)
    print(f"{model_dir} at {sparsity:.0%}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def test_drafter_perplexity_ordering(kit_dir):
    model_dir, calib, held_out = kit_data(kit_dir, "drafter")
    at_50 = perplexities(model_dir, calib, held_out, 0.5)
    assert at_50["dense"] <= at_50["sparsegpt"] < 1.10 * at_50["dense"], at_50  # half the weights, some loss
    assert at_50["sparsegpt"] <= min(at_50["wanda"], at_50["magnitude"]), at_50
    at_70 = perplexities(model_dir, calib, held_out, 0.7)
    assert at_70["sparsegpt"] < 0.98 * min(at_70["wanda"], at_70["magnitude"]), at_70


@pytest.mark.slow
def test_target_perplexity_ordering(kit_dir):
    model_dir, calib, held_out = kit_data(kit_dir, "target")
    at_50 = perplexities(model_dir, calib, held_out, 0.5)
    assert at_50["sparsegpt"] <= min(at_50["wanda"], at_50["magnitude"]), at_50
    assert at_50["sparsegpt"] < at_50["dense"] * 1.01, at_50
    at_70 = perplexities(model_dir, calib, held_out, 0.7)
    assert at_70["sparsegpt"] < 0.99 * min(at_70["wanda"], at_70["magnitude"]), at_70


def test_sparsegpt_reconstructs_a_kit_layer_better(kit_dir):
    """The drafter's last MLP down-projection on its real calibration inputs."""
    model_dir, calib, _ = kit_data(kit_dir, "drafter", num_samples=32)
    model = load_model(model_dir)
    layer = model.model.layers[-1].mlp.down_proj
    inputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in calib:
            model(ids, use_cache=False)
    handle.remove()
    x = torch.cat(inputs)
    hessian, norms = Hessian(x.shape[1]), InputNorms(x.shape[1])
    hessian.add(x)
    norms.add(x)
    weight = layer.weight.detach()
    for sparsity, nm in [(0.5, None), (0.5, (2, 4))]:
        errors = {
            "sparsegpt": reconstruction_error(weight, sparsegpt_prune(weight, hessian.matrix(), sparsity, nm)[0], x),
            "wanda": reconstruction_error(weight, wanda_prune(weight, norms.norms(), sparsity, nm)[0], x),
            "magnitude": reconstruction_error(weight, magnitude_prune(weight, sparsity, nm)[0], x),
        }
        print(f"down_proj reconstruction error at {sparsity} {nm}: {errors}")
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
