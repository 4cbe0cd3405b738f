"""Pure pruning math: exact sparsity, N:M groups, SparseGPT's reconstruction quality, light imports."""

from __future__ import annotations

import pytest
import torch

from sd2_ray.models.sparsity import check_nm
from sd2_ray.prune.magnitude import magnitude_prune
from sd2_ray.prune.quality import reconstruction_error
from sd2_ray.prune.selection import keep_nm, keep_unstructured
from sd2_ray.prune.sparsegpt import Hessian, inverse_hessian_factor, sparsegpt_prune
from sd2_ray.prune.wanda import InputNorms, wanda_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated features and a few large ones, like real hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[: cols // 16]] = 8.0
    return (torch.randn(tokens, cols, generator=g) @ mix) * scale


def layer_and_stats(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(rows, cols, generator=g)
    x = correlated_inputs(tokens, cols, seed)
    hessian, norms = Hessian(cols), InputNorms(cols)
    for chunk in x.split(100):
        hessian.add(chunk)
        norms.add(chunk)
    return weight, x, hessian, norms


def all_methods(weight, hessian, norms, sparsity, nm=None):
    sgpt, sgpt_keep, _ = sparsegpt_prune(weight, hessian.matrix(), sparsity, nm, block_size=16)
    wanda, wanda_keep = wanda_prune(weight, norms.norms(), sparsity, nm)
    mag, mag_keep = magnitude_prune(weight, sparsity, nm)
    return {"sparsegpt": (sgpt, sgpt_keep), "wanda": (wanda, wanda_keep), "magnitude": (mag, mag_keep)}


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(sparsity):
    weight, _, hessian, norms = layer_and_stats()
    for method, (pruned, keep) in all_methods(weight, hessian, norms, sparsity).items():
        zeros = int((pruned == 0).sum())
        # SparseGPT and magnitude: round(s * numel) per layer; Wanda: round(s * cols) per row.
        expected = (
            round(sparsity * weight.numel())
            if method != "wanda"
            else weight.shape[0] * round(sparsity * weight.shape[1])
        )
        assert zeros == expected == int((~keep).sum()), method
        assert bool((pruned[~keep] == 0).all()), method
        assert bool((pruned[keep] != 0).all()), method  # nothing kept was zeroed by accident


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_every_group_has_at_most_n(n, m):
    weight, _, hessian, norms = layer_and_stats()
    for method, (pruned, keep) in all_methods(weight, hessian, norms, 1 - n / m, (n, m)).items():
        assert check_nm(pruned, n, m), method
        assert not check_nm(weight, n, m)
        groups = keep.reshape(keep.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all()), method  # exactly N kept, not fewer


def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude():
    weight, x, hessian, norms = layer_and_stats(rows=64, cols=96, tokens=1024)
    for sparsity, nm in [(0.5, None), (0.7, None), (0.5, (2, 4))]:
        results = all_methods(weight, hessian, norms, sparsity, nm)
        errors = {k: reconstruction_error(weight, w, x) for k, (w, _) in results.items()}
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (sparsity, nm, errors)
        assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def test_sparsegpt_updates_beat_its_own_mask_without_updates():
    """The OBS updates (not just the mask choice) must lower the layer's output error."""
    weight, x, hessian, _ = layer_and_stats()
    pruned, keep, _ = sparsegpt_prune(weight, hessian.matrix(), 0.5, block_size=16)
    mask_only = weight * keep
    assert reconstruction_error(weight, pruned, x) < 0.8 * reconstruction_error(weight, mask_only, x)


def test_sparsegpt_lazy_block_updates_equal_column_by_column():
    """With N:M the mask of a group is chosen once every column to its left has updated it, so
    the block size (lazy batching) must not change the result: a check of the update algebra."""
    weight, _, hessian, _ = layer_and_stats()
    results = [sparsegpt_prune(weight, hessian.matrix(), 0.5, (2, 4), bs)[0] for bs in (4, 16, 64)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-5)


def test_inverse_hessian_factor_and_dead_inputs():
    _, x, _, _ = layer_and_stats(cols=32)
    x[:, 5] = 0  # an input that never fires
    hessian = Hessian(32)
    hessian.add(x)
    upper, dead = inverse_hessian_factor(hessian.matrix(), 0.01)
    assert dead.nonzero().flatten().tolist() == [5]
    h = hessian.matrix().double()
    h[5, 5] = 1.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(upper.t() @ upper, torch.linalg.inv(h), rtol=1e-6, atol=1e-9)
    weight = torch.randn(8, 32)
    pruned, _, _ = sparsegpt_prune(weight, hessian.matrix(), 0.25, block_size=8)
    assert bool((pruned[:, 5] == 0).all())


def test_selection_helpers_break_ties_by_count():
    scores = torch.ones(4, 8)  # all tied: a threshold would prune everything or nothing
    assert int((~keep_unstructured(scores, 0.5)).sum()) == 16
    assert int((~keep_unstructured(scores, 0.25, per_row=True)).sum(1).eq(2).sum()) == 4
    assert int(keep_nm(scores, 2, 4).sum()) == 16
