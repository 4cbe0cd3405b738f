"""What the fine-tune's driver checks and stages before any worker starts (pure: no Ray).

The model dir's masks are checked against its architecture (:func:`check_model_and_masks`);
every row is checked, the unusable ones skipped and listed, the loss checked against the
columns the rows carry, and the training (and held-out) rows staged as Parquet when the
workers could not read them as they are (:func:`prepare_data`); the run's step count follows
from the rows (:func:`total_steps`). Bad input fails here with a one-line error, before the
stage writes anything but its ``_skipped.jsonl``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sd2_ray import storage
from sd2_ray.errors import DataError
from sd2_ray.finetune.config import FinetuneConfig, check_loss_data
from sd2_ray.finetune.data import row_error
from sd2_ray.finetune.provenance import drafter_tokenizer, use_response_ids
from sd2_ray.rows import SKIPPED_FILE, require_usable, skip_record, write_skipped

log = logging.getLogger(__name__)

STAGED_DATA = "_data"  # under the output: the rows the workers read, when staged


def check_model_and_masks(config: FinetuneConfig) -> str:
    """Local copy of the model dir's config, sparsity report and masks (not its weights: the
    workers fetch those themselves), the masks checked against the architecture."""
    from sd2_ray.models.io import model_metadata_dir
    from sd2_ray.models.sparsity import MASKS_FILE, check_masks, load_masks

    local = model_metadata_dir(config.model, extra=(MASKS_FILE,))
    if not os.path.isfile(os.path.join(local, MASKS_FILE)):
        return local
    try:
        masks = load_masks(local)
    except Exception as err:
        raise DataError(f"{config.model}: cannot read {MASKS_FILE} ({type(err).__name__})") from None
    check_masks(_shape_model(local), masks, source=config.model)
    return local


def _shape_model(local: str):
    """The architecture on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoConfig

    from sd2_ray.models.io import auto_class

    with torch.device("meta"):
        return auto_class(local).from_config(AutoConfig.from_pretrained(local))


@dataclass
class PreparedData:
    """What the driver staged for the workers."""

    files: list[str]  # Parquet files of the training rows
    rows: int  # training rows
    eval_file: str | None = None  # held-out rows (eval_every), never trained on
    eval_rows: int = 0
    use_ids: bool = False  # train on response_ids (they are in the drafter's tokenizer)


def prepare_data(config: FinetuneConfig) -> PreparedData:
    """Every row is checked on the driver; rows that cannot be trained on (no instruction, no
    answer, unreadable JSONL lines) are skipped and listed in ``<output>/_skipped.jsonl``. The
    configured loss is checked against the columns the rows carry before anything is written,
    and so is whose tokenizer their ``response_ids`` are in (:mod:`sd2_ray.finetune.provenance`).
    With ``eval_every`` the last ``eval_rows`` usable rows (file order) are held out. When rows
    were skipped or held out, or the data is JSONL, the training rows are staged once as
    Parquet under ``<output>/_data`` so every worker reads exactly them."""
    from sd2_ray.rows import data_files, read_jsonl

    files = data_files(config.data)
    rows, skipped, schemas = [], [], []
    for file in files:
        unreadable: list[dict] = []
        if file.endswith(".parquet"):
            arrow = storage.read_parquet(file)
            schemas.append(arrow.schema)
            table = arrow.to_pylist()
        else:
            table = read_jsonl(file, unreadable)
        skipped.extend(unreadable)
        for number, row in enumerate(table, start=1):
            problem = row_error(row, config.response_field)
            if problem:
                skipped.append({**skip_record(number - 1, row, problem), "file": file, "row": number})
            else:
                rows.append(row)
    check_loss_data(config, {key for row in rows for key, value in row.items() if value is not None})
    use_ids = use_response_ids(config, rows, drafter_tokenizer(config))
    write_skipped(storage.join(config.output, SKIPPED_FILE), skipped)
    require_usable(config.data, len(rows), skipped, config.min_usable_share)
    if skipped:
        log.warning(
            "finetune: skipped %d of %d rows (e.g. %s); see %s",
            len(skipped),
            len(rows) + len(skipped),
            skipped[0]["reason"],
            storage.join(config.output, SKIPPED_FILE),
        )
    held: list[dict] = []
    if config.eval_every:
        rows, held = rows[: -config.eval_rows], rows[-config.eval_rows :]
    if len(rows) < config.batch_size:
        raise DataError(
            f"{config.data}: {len(rows)} usable rows{' after holding out eval_rows' if held else ''}, "
            f"fewer than one global batch (batch_size {config.batch_size})"
        )
    schema = _unified(schemas) if len(schemas) == len(files) else None
    if skipped or held or schema is None:
        files = [stage_rows(rows, storage.join(config.output, STAGED_DATA, "train.parquet"), schema)]
    if not held:
        return PreparedData(files, len(rows), use_ids=use_ids)
    eval_file = stage_rows(held, storage.join(config.output, STAGED_DATA, "eval.parquet"), schema)
    return PreparedData(files, len(rows), eval_file, len(held), use_ids)


def _unified(schemas: list):
    """One schema for the Parquet files' rows, so staged rows keep their types (float32 top-k
    stays float32); None when they disagree (the rows' own types are inferred then)."""
    import pyarrow as pa

    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def stage_rows(rows: list[dict], path: str, schema=None) -> str:
    """Rows written as one Parquet file (the format every worker reads), returned as its path."""
    import pyarrow as pa

    storage.write_parquet(path, pa.Table.from_pylist(rows, schema=schema))
    return path


def total_steps(config: FinetuneConfig, rows: int) -> int:
    """Optimizer steps of the run: whole global batches per epoch x epochs, capped by max_steps."""
    per_epoch = rows // config.batch_size  # the last partial batch is dropped (same on every worker)
    steps = per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps
