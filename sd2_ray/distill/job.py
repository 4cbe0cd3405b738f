"""``sd2 distill``: read prompts, plan shards, generate the pending ones on Ray, write the output.

Output directory (local or s3://)::

    config.yaml             the resolved config
    manifest.json           status (running -> complete, written last), counts per shard, settings,
                            the tokenizer response_ids are in (name, vocabulary fingerprint)
    shard-00000.parquet     one per input shard (rows in input order; schema: core.output_schema)
    _shards/shard-00000.json  the shard's completion record (counts, skipped rows, fingerprint)
    _skipped.jsonl          every skipped input row with the reason (rows the driver found unusable
                            and rows whose image an engine actor could not read)

A vision-language (LLaVA) target also takes image rows (:mod:`sd2_ray.distill.image_rows`: the
driver resolves their image references, the actors read the images); its output rows keep the
references in ``image`` / ``images``.

A shard is done when its record exists with the same fingerprint (input ids + settings); the
record is written after the Parquet file, so a killed run leaves at worst a shard to redo.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sd2_ray import manifest, storage
from sd2_ray.distill import core, image_rows
from sd2_ray.distill.config import DistillConfig
from sd2_ray.errors import ConfigError, DataError
from sd2_ray.models.tokens import tokenizer_identity
from sd2_ray.rows import require_usable, write_skipped

log = logging.getLogger(__name__)

STAGE = "distill"


def main(config: DistillConfig) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the final manifest."""
    out = config.output
    if manifest.is_complete(out) and not config.overwrite:
        log.info("%s is complete; skipping (use --overwrite to redo)", out)
        return manifest.read(out) or {}
    if config.overwrite and storage.exists(out):
        storage.delete(out)

    from sd2_ray.models.io import model_metadata_dir

    # Only config + tokenizer on the driver: the engine actors fetch the weights themselves,
    # each on its own node (an s3:// target is never downloaded whole to the driver).
    metadata_dir = model_metadata_dir(config.target)
    tokenizer, eos_ids, context = load_target_info(metadata_dir, config.trust_remote_code)
    if config.mode == "on-policy":
        check_drafter_tokenizer(config, tokenizer)
    max_prompt = config.prompt_limit(context)
    vision = image_rows.vision_target(metadata_dir, config.prompts)
    unreadable: list[dict[str, Any]] = []
    rows = read_input(config, unreadable)
    image_rows.check_input(rows, config, vision)  # one line, exit 2: input this run cannot take
    requests, skipped = core.prepare_rows(rows, tokenizer, config.mode, max_prompt, config.shard_size, vision)
    # bad rows are counted and skipped; no usable row at all is bad input (exit 2), before any output
    require_usable(config.prompts, len(requests), unreadable + skipped, config.min_usable_share)
    plan = plan_shards(rows, requests, skipped, config, max_prompt, vision)
    log_too_long(skipped, max_prompt, config, context)

    config.save(out)
    manifest.start(
        out,
        STAGE,
        **manifest_fields(config, len(rows), plan, max_prompt),
        tokenizer=tokenizer_identity(tokenizer, config.target),
    )
    started = time.time()
    try:
        run_pending(plan, requests, skipped, eos_ids, config, context, vision is not None)
    except Exception as err:
        manifest.fail(out, STAGE, f"{type(err).__name__}: {err}")
        raise
    return finish(plan, unreadable, config, len(rows), time.time() - started)


def load_target_info(model_dir: str, trust_remote_code: bool) -> tuple[Any, list[int], int]:
    """(tokenizer, EOS ids, context length) read on the driver from a dir without weights."""
    from transformers import AutoConfig, GenerationConfig

    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.models.tokens import eos_token_ids

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = None
    eos_ids = eos_token_ids(generation, model_config, tokenizer)
    # a LLaVA config keeps its LM's context in text_config (a text model's text config is itself)
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None) or 2048
    return tokenizer, eos_ids, int(context)


def log_too_long(skipped: list[dict[str, Any]], max_prompt: int, config: DistillConfig, context: int) -> None:
    too_long = sum(1 for s in skipped if s["reason"].endswith(f"max_prompt_tokens={max_prompt}"))
    if too_long:
        log.warning(
            "%d prompts longer than %d tokens skipped up front (engine context %d - max_new_tokens %d; listed in %s)",
            too_long,
            max_prompt,
            config.model_len(context),
            config.max_new_tokens,
            core.SKIPPED_FILE,
        )


def check_drafter_tokenizer(config: DistillConfig, target_tokenizer) -> None:
    """On-policy mode scores the drafter's token ids with the target: one vocabulary, or nothing."""
    from sd2_ray.models.io import load_tokenizer, model_metadata_dir

    assert config.drafter is not None  # DistillConfig requires one in on-policy mode
    drafter = load_tokenizer(model_metadata_dir(config.drafter), trust_remote_code=config.trust_remote_code)
    if drafter.get_vocab() != target_tokenizer.get_vocab():
        raise DataError(
            f"{config.drafter}: on-policy needs a drafter with the target's tokenizer "
            "(the target scores the drafter's token ids)"
        )


def read_input(config: DistillConfig, unreadable: list[dict[str, Any]]) -> list[Any]:
    """The prompt rows; lines that are not JSON objects go to ``unreadable`` (with file and line).
    With ``categories``, only rows of those categories count, and ``limit`` takes the first of them."""
    from sd2_ray.rows import read_rows

    if not config.categories:
        return read_rows(config.prompts, limit=config.limit, skipped=unreadable)
    rows = read_rows(config.prompts, skipped=unreadable)
    kept = in_categories(rows, config.categories, config.prompts)
    log.info("%d of %d prompt rows are in categories %s", len(kept), len(rows), ", ".join(config.categories))
    return kept[: config.limit] if config.limit else kept


def in_categories(rows: list[Any], categories: list[str], source: str) -> list[Any]:
    """The rows of the given categories (rows that are not objects stay, to be listed as bad);
    a category no row has is a typo, not an empty selection."""
    from sd2_ray.rows import category_of

    present = {category_of(r) for r in rows if isinstance(r, dict)}
    missing = [c for c in categories if c not in present]
    if missing:
        named = ", ".join(sorted(c for c in present if c)) or "none"
        raise ConfigError(f"field 'categories': no row of {source} has category {missing} (its categories: {named})")
    wanted = set(categories)
    return [r for r in rows if not isinstance(r, dict) or category_of(r) in wanted]


def shard_settings(
    config: DistillConfig, max_prompt: int, vision: image_rows.VisionTarget | None = None
) -> dict[str, Any]:
    """Everything that changes a shard's content (engine and pool size do not). A vision
    target's run adds where relative image paths resolve (a text run's settings are as before,
    so its finished shards stay finished)."""
    settings = {
        "target": config.target,
        "mode": config.mode,
        "sampling": config.sampling_dict(),
        "max_prompt_tokens": max_prompt,
        "allow_truncated": config.allow_truncated,
        "dtype": config.dtype,
        "shard_size": config.shard_size,
        "row_schema": core.ROW_SCHEMA_VERSION,
        "logprobs_top_k": config.logprobs_top_k,
        "drafter": config.drafter,
        "categories": config.categories,
    }
    if vision is not None:
        settings["image_base_dir"] = vision.base_dir
    return settings


def plan_shards(
    rows: list[Any],
    requests: list[core.Request],
    skipped: list[dict[str, Any]],
    config: DistillConfig,
    max_prompt: int,
    vision: image_rows.VisionTarget | None = None,
) -> dict[int, dict[str, Any]]:
    """Per shard: input size, fingerprint, and whether an earlier run already finished it."""
    settings = shard_settings(config, max_prompt, vision)
    plan: dict[int, dict[str, Any]] = {}
    for shard in range(core.num_shards(len(rows), config.shard_size)):
        lo, hi = shard * config.shard_size, min(len(rows), (shard + 1) * config.shard_size)
        ids = [core.safe_row_id(rows[i], i) for i in range(lo, hi)]
        fp = core.fingerprint(ids, settings)
        record = read_record(config.output, shard)
        done = (
            record is not None
            and record.get("fingerprint") == fp
            and storage.exists(storage.join(config.output, core.shard_file(shard)))
        )
        plan[shard] = {"rows_in": hi - lo, "fingerprint": fp, "done": done}
    done = sum(1 for p in plan.values() if p["done"])
    if done:
        log.info("resuming: %d of %d shards already complete", done, len(plan))
    return plan


def read_record(out: str, shard: int) -> dict[str, Any] | None:
    path = storage.join(out, core.record_file(shard))
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except ValueError:
        return None


def run_pending(
    plan: dict[int, dict[str, Any]],
    requests: list[core.Request],
    skipped: list[dict[str, Any]],
    eos_ids: list[int],
    config: DistillConfig,
    context: int,
    vision: bool = False,
) -> None:
    from tqdm import tqdm

    from sd2_ray.distill.ray_data import generate_shards

    skipped_by_shard: dict[int, list[dict[str, Any]]] = {s: [] for s in plan}
    for row in skipped:
        skipped_by_shard[row["shard"]].append(row)
    pending = [r for r in requests if not plan[r.shard]["done"]]
    with_requests = {r.shard for r in pending}

    def write(shard: int, answered: list[tuple[core.Request, core.Generated]]) -> None:
        write_shard(config, shard, plan[shard], answered, skipped_by_shard[shard], vision)

    for shard, info in plan.items():  # shards whose every row was skipped need no engine
        if not info["done"] and shard not in with_requests:
            write(shard, [])
    log.info(
        "%d rows to generate in %d shards (%d rows skipped overall)", len(pending), len(with_requests), len(skipped)
    )
    with tqdm(total=len(pending), desc="distill", unit="row") as progress:
        generate_shards(
            pending, config.target, config, eos_ids, write, progress=progress, context=context, vision=vision
        )


def write_shard(
    config: DistillConfig,
    shard: int,
    info: dict[str, Any],
    answered: list[tuple[core.Request, core.Generated]],
    skipped: list[dict[str, Any]],
    vision: bool = False,
) -> None:
    """Parquet first, then the record that marks the shard complete. Rows the engine skipped
    (an unreadable image) join the driver's skipped rows: the record holds them all, so a
    resumed run that never regenerates this shard still counts and lists them."""
    answered, engine_skipped = core.split_skipped(answered)
    skipped = sorted([*skipped, *engine_skipped], key=lambda s: s["index"])
    results = [core.result_row(req, gen, config.mode, config.allow_truncated) for req, gen in answered]
    storage.write_parquet(
        storage.join(config.output, core.shard_file(shard)),
        core.result_table(results, config.logprobs_top_k, images=vision),
    )
    record = core.shard_record(shard, info["fingerprint"], info["rows_in"], results, skipped)
    storage.write_json(storage.join(config.output, core.record_file(shard)), record)
    info["done"] = True
    log.info(
        "shard %d written: %d rows out, %d skipped (%d unreadable images), %d failed",
        shard,
        record["rows_out"],
        record["skipped"],
        record["bad_images"],
        record["failed"],
    )


def manifest_fields(
    config: DistillConfig, rows_in: int, plan: dict[int, dict[str, Any]], max_prompt: int
) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "engine": config.engine,
        "model": config.target,
        "prompts": config.prompts,
        "sampling": config.sampling_dict(),
        "shard_size": config.shard_size,
        "num_shards": len(plan),
        "rows_in": rows_in,
        "logprobs_top_k": config.logprobs_top_k,
        "drafter": config.drafter,
        "max_prompt_tokens": max_prompt,
    }


def finish(
    plan: dict[int, dict[str, Any]],
    unreadable: list[dict[str, Any]],
    config: DistillConfig,
    rows_in: int,
    seconds: float,
) -> dict[str, Any]:
    """Gather the shard records, drop stale shards of a bigger earlier input, mark complete.
    ``_skipped.jsonl``: the unreadable input lines, then every shard record's skipped rows."""
    out = config.output
    records: list[dict[str, Any]] = []
    missing = []
    for shard in sorted(plan):
        record = read_record(out, shard)
        if record is None:
            missing.append(shard)
        else:
            records.append(record)
    if missing:
        raise RuntimeError(f"{out}: shards {missing} have no completion record")
    remove_stale_shards(out, len(plan))
    write_skipped(
        storage.join(out, core.SKIPPED_FILE), unreadable + [s for r in records for s in r.get("skipped_rows", [])]
    )
    totals = {
        key: sum(r.get(key, 0) for r in records)
        for key in (
            "rows_in",
            "rows_out",
            "skipped",
            "bad_images",
            "failed",
            "from_target",
            "from_reference",
            "from_drafter",
            "response_tokens",
        )
    }
    shards = [{k: v for k, v in r.items() if k != "skipped_rows"} for r in records]
    if not totals["rows_out"]:
        raise DataError(
            f"{out}: no row was distilled ({totals['failed']} failed, {totals['skipped']} skipped; "
            "the errors are in the shards' error column)"
        )
    data = manifest.complete(
        out, STAGE, rows_in=rows_in, totals=totals, shards=shards, error=None, last_run_seconds=round(seconds, 2)
    )
    log.info("distill complete: %s", totals)
    return data


def remove_stale_shards(out: str, num_shards: int) -> None:
    for path in storage.list_files(out, suffix=".parquet"):
        name = storage.basename(path)
        if name.startswith(core.SHARD_PREFIX) and int(name[len(core.SHARD_PREFIX) : -len(".parquet")]) >= num_shards:
            storage.delete(path)
            storage.delete(storage.join(out, core.record_file(int(name[len(core.SHARD_PREFIX) : -8]))))
