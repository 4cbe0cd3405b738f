"""Evaluate a target + drafter pair in-process (pure torch, no Ray): the measuring stick that
``sd2 eval``, tune and the pipeline share.

The target-only baseline is measured with the *same* engine and batching (drafter off), so the
measured speedup isolates speculation. It can be measured once with
:func:`measure_target_only` and passed to many :func:`evaluate_pair` calls (the pipeline
scores several drafters on the same prompts).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sd2_ray.errors import DataError
from sd2_ray.evaluate.figures import category_figures, figures, mal_interval, prompt_categories
from sd2_ray.models.device import input_device
from sd2_ray.models.macs import linear_macs
from sd2_ray.models.tokens import encode_rendered
from sd2_ray.rows import DUPLICATE_ID, render_prompt, repeated_ids, require_usable, row_id, row_problem, skip_record
from sd2_ray.specdec.engine import SpeculativeEngine
from sd2_ray.specdec.types import GenerationRequest, SamplingParams, SpecStats

logger = logging.getLogger(__name__)


def usable_prompts(
    rows: list[dict[str, Any]], tokenizer, max_prompt_tokens: int | None = None
) -> tuple[list[list[int]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt ids, the rows they came from, skipped rows with reasons): each row's prompt rendered
    with the target's chat template. Rows without a usable prompt, or whose prompt leaves no room
    for the generation inside the models' context (``max_prompt_tokens``), are skipped, as distill
    and serve skip or refuse them: decoding past the context window is not an eval. A row whose
    id an earlier row has is skipped too (the id is the key every result is reported under)."""
    prompts, kept, skipped = [], [], []
    repeated = repeated_ids(rows)
    for index, row in enumerate(rows):
        problem = row_problem(row) if isinstance(row, dict) else "row must be an object"
        problem = DUPLICATE_ID if index in repeated else problem
        ids = [] if problem else encode_rendered(render_prompt(row, tokenizer), tokenizer)
        if not problem and not ids:
            problem = "prompt renders to no tokens"
        if not problem and max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            problem = (
                f"prompt has {len(ids)} tokens; with the generation it would pass the context "
                f"window (at most {max_prompt_tokens} prompt tokens)"
            )
        if problem:
            skipped.append(skip_record(index, row, problem))
        else:
            prompts.append(ids)
            kept.append(row)
    return prompts, kept, skipped


def prepare_prompts(rows: list[dict[str, Any]], tokenizer) -> list[list[int]]:
    """Token ids of the usable rows' prompts (see :func:`usable_prompts`)."""
    return usable_prompts(rows, tokenizer)[0]


def eval_prompts(rows: list[dict[str, Any]], tokenizer, target, settings, k: int, unreadable=()):
    """(prompt ids, kept rows, skipped rows) as every eval of these rows uses them (the baseline
    and each drafter alike): the prompt plus ``max_new_tokens`` plus K draft tokens must fit the
    target's context window, which is what losslessness is judged against. Fails (DataError)
    when too few rows remain (``settings.min_usable_share``)."""
    limit = context_length(target) - settings.max_new_tokens - k - 1
    if _is_vision(target):
        from sd2_ray.vision.evaluate import image_prompts, images_dir

        prompts, kept, skipped = image_prompts(rows, tokenizer, target, limit, images_dir(settings))
    else:
        prompts, kept, skipped = usable_prompts(rows, tokenizer, limit)
    require_usable("eval prompts", len(prompts), [*unreadable, *skipped], settings.min_usable_share)
    if skipped:
        logger.warning("eval: skipped %d of %d prompts (e.g. %s)", len(skipped), len(rows), skipped[0]["reason"])
    return prompts, kept, skipped


def context_length(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def prompt_seed(base: int, prompt_ids: list[int]) -> int:
    """A prompt's sampling seed: the base seed plus a digest of its tokens, so a prompt samples
    the same tokens wherever it sits in the file (an order-free eval)."""
    digest = hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()
    return (base + int(digest[:8], 16)) % 2**31


def _requests(prompts: list[list[int]], settings) -> list[GenerationRequest]:
    """A request per prompt; a VLM's prompts carry their images (``ImagePrompt``)."""
    return [
        GenerationRequest(
            p,
            settings.max_new_tokens,
            SamplingParams(
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                seed=prompt_seed(settings.seed, p),
            ),
            images=getattr(p, "images", ()),
        )
        for p in prompts
    ]


@dataclass
class Decoded:
    """One decoding run over the prompts: outputs and stats in request order, times summed."""

    outputs: list[list[int]]
    stats: SpecStats  # summed over every request
    seconds: float  # wall clock
    cpu: float  # process CPU time
    request_stats: list[SpecStats] = field(default_factory=list)
    category_seconds: dict[str, tuple[float, float]] = field(default_factory=dict)  # (wall, CPU) per category


def batches(requests: list[GenerationRequest], batch_size: int, categories: list[str] | None):
    """(category, request indices) per batch: similar prompt lengths together (less padding), and
    never two categories in one batch, so each batch's time is one category's. Without
    categories this is plain length order. Equal lengths are ordered by the prompt's tokens, not
    by its place in the file, so a batch holds the same prompts whatever the rows' order."""
    labels = categories or [""] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: (labels[i], len(requests[i].prompt_ids), requests[i].prompt_ids))
    for label, group in itertools.groupby(order, key=lambda i: labels[i]):
        members = list(group)
        for start in range(0, len(members), batch_size):
            yield label, members[start : start + batch_size]


def _run(
    engine: SpeculativeEngine,
    requests: list[GenerationRequest],
    batch_size: int,
    desc: str,
    progress: bool,
    categories: list[str] | None = None,
) -> Decoded:
    """Decode in batches (:func:`batches`); outputs in request order. CPU time is measured too
    because wall clock on a shared machine measures the neighbours as much as the engine."""
    from tqdm import tqdm

    k = engine.num_speculative_tokens
    decoded = Decoded([[] for _ in requests], SpecStats(num_speculative_tokens=k, accepted_per_position=[0] * k), 0, 0)
    decoded.request_stats = [decoded.stats for _ in requests]
    with tqdm(total=len(requests), desc=desc, unit="prompt", disable=not progress) as bar:
        for label, chunk in batches(requests, batch_size, categories):
            began, began_cpu = time.perf_counter(), time.process_time()
            results = engine.generate([requests[i] for i in chunk])
            seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
            decoded.seconds += seconds
            decoded.cpu += cpu
            if categories:
                wall_so_far, cpu_so_far = decoded.category_seconds.get(label, (0.0, 0.0))
                decoded.category_seconds[label] = (wall_so_far + seconds, cpu_so_far + cpu)
            for i, result in zip(chunk, results, strict=True):
                decoded.outputs[i] = result.token_ids
                decoded.request_stats[i] = result.stats
                decoded.stats = decoded.stats.merge(result.stats)
            bar.update(len(chunk))
    return decoded


def _warm_up(engine: SpeculativeEngine, prompts: list[list[int]]) -> None:
    """One short untimed decode so first-call allocations don't count against either side."""
    if getattr(prompts[0], "images", ()):
        from sd2_ray.vision.evaluate import warm_up_request

        engine.generate([warm_up_request(prompts[0])])
    else:
        engine.generate([GenerationRequest(prompts[0][:16], 4)])


def measure_target_only(
    target,
    prompts: list[list[int]],
    settings,
    *,
    progress: bool = True,
    target_tokenizer=None,
    categories: list[str] | None = None,
) -> dict[str, Any]:
    """Target-only decoding of the prompts with the engine's batching (``settings``: an
    :class:`~sd2_ray.evaluate.config.EvalSettings`): outputs and throughput, and the time of each
    category's batches when ``categories`` (one label per prompt, :func:`prompt_categories`)."""
    if _is_vision(target):
        from sd2_ray.vision.evaluate import target_only_engine

        engine: SpeculativeEngine = target_only_engine(target, target_tokenizer, settings)
    else:
        engine = SpeculativeEngine(target, None, 0, target_tokenizer, compile=settings.compile)
    _warm_up(engine, prompts)
    run = _run(engine, _requests(prompts, settings), settings.batch_size, "target-only", progress, categories)
    tokens = sum(len(o) for o in run.outputs)
    return {
        "outputs": run.outputs,
        "seconds": run.seconds,
        "cpu_seconds": run.cpu,
        "categories": categories,
        "category_seconds": run.category_seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / run.seconds if run.seconds else 0.0,
        "temperature": settings.temperature,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "num_prompts": len(prompts),
    }


def resolve_placement(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """(device, torch dtype) for the config names, resolved in *this* process (the one that loads
    the models): device auto = cuda if available else cpu; dtype auto = bf16 on cuda, fp32 on cpu."""
    from sd2_ray.models.device import resolve_device, resolve_dtype

    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def load_target(path: str, device: str = "auto", dtype: str = "auto", device_map=None):
    """(model, tokenizer) of a target placed as the eval config says."""
    from sd2_ray.models.io import load_model, load_tokenizer

    where, torch_dtype = resolve_placement(device, dtype)
    if _is_vision(path):
        from sd2_ray.vision.evaluate import load_target as load_vlm_target

        return load_vlm_target(path, torch_dtype, where)
    return (load_model(path, dtype=torch_dtype, device=where, device_map=device_map), load_tokenizer(path))


def _load(path_or_model, dtype, device, device_map=None):
    """A model dir loaded onto ``device`` (or by ``device_map``); a loaded model as it is."""
    from sd2_ray.models.io import load_model, load_tokenizer

    if isinstance(path_or_model, str):
        return (
            load_model(path_or_model, dtype=dtype, device=device, device_map=device_map),
            load_tokenizer(path_or_model),
        )
    return path_or_model, None


def _on_device(model, device: str):
    """A loaded drafter moved to the target's device (in place; no copy when already there)."""
    return model.to(device) if str(input_device(model)) != device else model


def evaluate_pair(
    target_dir,
    drafter_dir,
    rows: list[dict[str, Any]],
    num_speculative_tokens: int,
    settings,
    *,
    baseline: dict[str, Any] | None = None,
    target_tokenizer=None,
    drafter_tokenizer=None,
    progress: bool = True,
    unreadable=(),
) -> dict[str, Any]:
    """Spec-decode ``rows`` with the pair and return the report dict (see ``sd2 eval``);
    ``settings`` is an :class:`~sd2_ray.evaluate.config.EvalSettings` (decoding, batching,
    placement, row policy).

    ``target_dir``/``drafter_dir`` are model dirs (local or s3://) or already loaded models (then
    pass the tokenizers). ``baseline``: a :func:`measure_target_only` result for the same prompts
    and settings to reuse; else it is measured here unless ``settings.measure_baseline`` is False
    (then ``measured_speedup`` and ``lossless`` are None). ``unreadable``: rows the reader
    already left out (they count towards the usable share). A loaded target stays where it is;
    the drafter always runs where the target takes its inputs (a loaded one is moved there).
    """
    from sd2_ray.models.device import dtype_name

    where, torch_dtype = resolve_placement(settings.device, settings.dtype)
    if isinstance(target_dir, str) and _is_vision(target_dir):
        from sd2_ray.vision.evaluate import load_target as load_vlm_target

        target, t_tok = load_vlm_target(target_dir, torch_dtype, where)
    else:
        target, t_tok = _load(target_dir, torch_dtype, where, settings.device_map)
    where = str(input_device(target))
    t_tok = target_tokenizer or t_tok
    if t_tok is None:
        raise DataError("evaluate_pair: a loaded target model needs target_tokenizer")
    k = num_speculative_tokens
    engine, d_macs = _engine(target, drafter_dir, k, t_tok, drafter_tokenizer, torch_dtype, where, settings)
    prompts, kept, skipped = eval_prompts(rows, t_tok, target, settings, k, unreadable)
    categories = prompt_categories(kept)
    if baseline is None and settings.measure_baseline:
        baseline = measure_target_only(
            target, prompts, settings, progress=progress, target_tokenizer=t_tok, categories=categories
        )
    if baseline is not None and baseline.get("num_prompts", len(prompts)) != len(prompts):
        raise DataError(f"evaluate_pair: baseline has {baseline['num_prompts']} prompts, rows have {len(prompts)}")
    _warm_up(engine, prompts)
    run = _run(engine, _requests(prompts, settings), settings.batch_size, f"spec K={k}", progress, categories)
    t_macs = _target_macs(target)
    report = figures(run.stats, run.seconds, run.cpu, run.outputs, baseline, t_macs, d_macs, k, settings.temperature)
    report.update(
        mal_ci95=mal_interval(run.request_stats),
        cross_tokenizer=getattr(engine, "cross_tokenizer", False),
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        dtype=dtype_name(torch_dtype),
        device=where,
        num_prompts=len(prompts),
        skipped_prompts=skipped,
        prompt_ids=[row_id(r) for r in kept],
        categories=category_figures(categories, run, baseline, t_macs, d_macs, k, settings.temperature),
        outputs=run.outputs,
        target=target_dir if isinstance(target_dir, str) else None,
        drafter=drafter_dir if isinstance(drafter_dir, str) else None,
    )
    if "per_image" in d_macs:
        from sd2_ray.vision.evaluate import image_report

        report["vision"] = image_report(d_macs, prompts)
    return report


def _is_vision(target) -> bool:
    """Whether the target (dir or model) is a vision-language model (:mod:`sd2_ray.vision.evaluate`)."""
    from sd2_ray.vision.evaluate import is_vision_target

    return is_vision_target(target)


def _target_macs(target) -> dict[str, Any]:
    """Per-token MACs of the target: a VLM's language model only (images are costed apart)."""
    if _is_vision(target):
        from sd2_ray.vision.evaluate import lm_macs

        return lm_macs(target)
    return linear_macs(target)


def _engine(target, drafter_dir, k: int, t_tok, d_tok, torch_dtype, where: str, settings):
    """(decoding engine, drafter MACs report): a drafter model (dir or loaded), a feature head's
    dir (:mod:`sd2_ray.feature.evaluate`: the head drafts from the target's features), or any
    drafter of a VLM target (:mod:`sd2_ray.vision.evaluate`: MASSV or text-only)."""
    if _is_vision(target):
        from sd2_ray.vision.evaluate import pair_engine

        return pair_engine(target, drafter_dir, k, t_tok, d_tok, torch_dtype, where, settings)
    if isinstance(drafter_dir, str):
        from sd2_ray.feature.evaluate import head_engine, is_head_dir

        if is_head_dir(drafter_dir):
            return head_engine(target, drafter_dir, k)
    drafter, loaded_tok = _load(drafter_dir, torch_dtype, where)
    drafter = _on_device(drafter, where)
    engine = SpeculativeEngine(target, drafter, k, t_tok, d_tok or loaded_tok, compile=settings.compile)
    return engine, linear_macs(drafter)
