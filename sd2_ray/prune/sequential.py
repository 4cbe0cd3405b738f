"""Sequential one-shot pruning: decoder block by decoder block, on already-pruned inputs.

The calibration samples run through the model once to record what every decoder block is
called with. Then, for each block in order: hooks collect the statistics of its targeted
linear layers (Hessian for SparseGPT, input norms for Wanda) while the block runs on its
current inputs; those layers are pruned; the block runs again, now pruned, and its outputs
become the next block's inputs. So block k is calibrated on what the pruned blocks 0..k-1
actually produce (as in SparseGPT and llm-compressor's sequential pipeline). Targeted layers
outside the blocks (an LM head, if asked for) are pruned last, on a full pass of the pruned model.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from sd2_ray.errors import ConfigError
from sd2_ray.prune.magnitude import magnitude_prune
from sd2_ray.prune.selection import check_shape_for_nm
from sd2_ray.prune.sparsegpt import Hessian, sparsegpt_prune
from sd2_ray.prune.wanda import InputNorms, wanda_prune

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def matches(name: str, patterns: list[str]) -> bool:
    """Module name matches a glob pattern, or a ``re:`` regular expression (searched)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def select_targets(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> dict[str, torch.nn.Linear]:
    """The linear layers to prune, in model order."""
    chosen = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and matches(name, targets) and not matches(name, ignore)
    }
    if not chosen:
        raise ConfigError(f"targets: no linear layer matches {targets} (ignore {ignore})")
    return chosen


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module name, list) of the decoder blocks: the ModuleList with one entry per hidden layer."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == count and count:
            return name, mod
    raise ConfigError(f"model: cannot find the decoder blocks of {type(model).__name__}")


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_block_calls(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(block-0 inputs per sample, keyword args per sample per block) from one dense pass.

    Keyword args (rotary embeddings, masks for this block's attention type, positions) are
    recorded for every block, so architectures whose blocks differ (sliding-window layers)
    are replayed faithfully.
    """
    inputs: list[torch.Tensor] = []
    calls: list[list[dict]] = []

    def recorder(index: int) -> Callable:
        def hook(_mod, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                inputs.append(hidden.detach())
            calls[-1].append(kwargs)
            if index == len(blocks) - 1:
                raise _StopForward  # everything after the last block is not needed

        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                calls.append([])
                try:
                    model(ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return inputs, calls


def _collect(modules: dict[str, torch.nn.Linear], method: str, run: Callable[[], None]) -> dict[str, Any]:
    """Run ``run`` with hooks feeding every module's inputs into its statistic."""
    stats: dict[str, Any] = {}
    handles = []
    for name, mod in modules.items():
        kind = Hessian if method == "sparsegpt" else InputNorms
        stats[name] = kind(mod.in_features, device=mod.weight.device)
        handles.append(mod.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0])))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


def prune_layer(name: str, module: torch.nn.Linear, stat: Any, config) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prune one linear layer in place; returns (keep-mask, per-layer report)."""
    started = time.perf_counter()
    nm, sparsity = config.nm, config.target_sparsity
    check_shape_for_nm(name, module.weight, nm)
    entry: dict[str, Any] = {}
    if config.method == "sparsegpt":
        new, keep, loss = sparsegpt_prune(
            module.weight, stat.matrix(), sparsity, nm, config.block_size, config.dampening
        )
        entry["obs_loss"] = loss
    elif config.method == "wanda":
        new, keep = wanda_prune(module.weight, stat.norms(), sparsity, nm)
    else:
        new, keep = magnitude_prune(module.weight, sparsity, nm)
    with torch.no_grad():
        module.weight.copy_(new)
    entry.update(
        shape=list(module.weight.shape),
        sparsity=1.0 - keep.float().mean().item(),
        seconds=round(time.perf_counter() - started, 4),
    )
    if stat is not None:
        entry["calibration_tokens"] = stat.tokens
    return keep.cpu(), entry


def _prune_blocks(model, batches, targets, config, masks, layers) -> None:
    prefix, blocks = decoder_blocks(model)
    hidden, calls = capture_block_calls(model, blocks, batches)
    for index, block in enumerate(tqdm(blocks, desc=f"prune {config.method}", unit="block")):
        inside = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{index}.")}

        def run_block(block=block, index=index) -> None:  # bound now: B023
            for sample, h in enumerate(hidden):
                block(h, **calls[sample][index])

        if inside:
            stats = _collect(inside, config.method, run_block)
            for name, mod in inside.items():
                masks[name], layers[name] = prune_layer(name, mod, stats.pop(name), config)
            log.info(
                "block %d: pruned %d layers (%.1f%% of their weights)",
                index,
                len(inside),
                100 * sum(layers[n]["sparsity"] for n in inside) / len(inside),
            )
        with torch.no_grad():  # the pruned block's outputs feed the next block, replaced one by
            for s in range(len(hidden)):  # one: a new list would hold every sample twice
                hidden[s] = block_output(block(hidden[s], **calls[s][index]))


def _prune_outside(model, batches, outside, config, masks, layers) -> None:
    device = next(model.parameters()).device

    def run_model() -> None:
        for ids in batches:
            model(ids.to(device), use_cache=False)

    stats = _collect(outside, config.method, run_model)
    for name, mod in outside.items():
        masks[name], layers[name] = prune_layer(name, mod, stats.pop(name), config)


def prune_model(
    model: torch.nn.Module, calibration_batches: list[torch.Tensor] | None, config
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Prune ``model`` in place per ``config`` (a :class:`PruneConfig`).

    Returns (model, masks keyed ``<module>.weight`` with ``True`` = kept, sparsity report in the
    ``sparsity.json`` layout). Method ``layers`` drops whole blocks and is its own entry point,
    :func:`sd2_ray.prune.layers.layer_prune` (which builds on this module's block helpers).
    """
    if config.method == "layers":
        raise ValueError("method 'layers' drops blocks: call sd2_ray.prune.layers.layer_prune, not prune_model")
    started = time.perf_counter()
    targets = select_targets(model, config.targets, config.ignore)
    module_masks: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    if config.method == "magnitude":
        for name, mod in tqdm(targets.items(), desc="prune magnitude", unit="layer"):
            module_masks[name], layers[name] = prune_layer(name, mod, None, config)
    else:
        if not calibration_batches:
            raise ConfigError(f"calibration: method '{config.method}' needs calibration samples")
        prefix, _ = decoder_blocks(model)
        outside = {n: m for n, m in targets.items() if not n.startswith(prefix + ".")}
        _prune_blocks(model, calibration_batches, targets, config, module_masks, layers)
        if outside:
            _prune_outside(model, calibration_batches, outside, config, module_masks, layers)
    names = [n for n in targets if n in module_masks]
    masks = {f"{n}.weight": module_masks[n] for n in names}
    report = sparsity_report(config, {n: layers[n] for n in names}, masks, time.perf_counter() - started)
    return model, masks, report


def sparsity_report(
    config, layers: dict[str, dict[str, Any]], masks: dict[str, torch.Tensor], seconds: float
) -> dict[str, Any]:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {
        "method": config.method,
        "pattern": config.pattern,
        "target_sparsity": config.target_sparsity,
        "total_sparsity": zeros / total if total else 0.0,
        "pruned_parameters": zeros,
        "targeted_parameters": total,
        "targets": config.targets,
        "ignore": config.ignore,
        "block_size": config.block_size if config.method == "sparsegpt" else None,
        "dampening": config.dampening if config.method == "sparsegpt" else None,
        "seconds": round(seconds, 3),
        "layers": layers,
    }
