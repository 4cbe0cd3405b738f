"""Pure distillation logic (no Ray): rows -> engine requests -> result rows, shards, filters.

Prompt rows follow DESIGN.md (``prompt`` or ``messages``, optional ``response``, ``id`` and
``category``; the category travels to the output row unchanged).
Each usable row becomes a :class:`Request` whose prompt is rendered with the target's chat
template and tokenized *here*, once, so every engine (transformers or vLLM) sees the same ids.
Unusable rows (no prompt, wrong types, over-long prompt, an id an earlier row already has) are
skipped with a reason, never fatal; so is a row whose image an engine actor cannot read (the
actor reports it, :func:`split_skipped` moves it to the shard's skipped rows).
For a vision-language target, image rows (``image`` / ``images``) are prepared by
:mod:`sd2_ray.distill.image_rows` and keep their (resolved) image references in the output.
The output row contract (columns, types, sizes) is documented on
:class:`sd2_ray.distill.config.DistillConfig`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sd2_ray import rows as rowlib
from sd2_ray import storage
from sd2_ray.rows import SKIPPED_FILE  # noqa: F401  (one name for every stage's skip list)

if TYPE_CHECKING:
    from sd2_ray.distill.image_rows import VisionTarget

SHARD_PREFIX = "shard-"
RECORDS_DIR = "_shards"  # per-shard completion records; "_" keeps them out of dataset listings

# Rewrite mode: the target sees the instruction and the reference, and answers in its own words.
REWRITE_TEMPLATE = (
    "Below is an instruction and a reference answer.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Write your own answer to the instruction, in your own words. Reply with the answer only."
)
# A rewrite that echoes the wrapper's wording learned the wrapper, not the answer: reject it.
LEAK_PHRASES = ("reference answer", "in your own words", "instruction:", "reply with the answer only")

TARGET, REFERENCE, DRAFTER = "target", "reference", "drafter"
BAD_IMAGE_PREFIX = "image:"  # how every unreadable-image skip reason starts (vision.images.BadImage)
# Bumped whenever the row contract changes: part of every shard's fingerprint, so a resumed
# run never mixes shards of two schemas in one output.
ROW_SCHEMA_VERSION = 3  # 3: the category column


@dataclass
class Request:
    """One usable input row, ready for an engine."""

    index: int  # position in the input (stable across runs)
    shard: int
    id: str
    messages: list[dict[str, str]] | None  # the original conversation (without a trailing answer)
    prompt: str | None  # or the original plain prompt
    reference: str | None
    prompt_text: str  # what the engine sees (chat template applied; rewrite wrapper in rewrite mode)
    prompt_ids: list[int]
    category: str | None = None  # the input row's task category, copied to the output row
    image: str | None = None  # the row's image reference(s), relative paths resolved
    images: list[str] | None = None

    @property
    def image_refs(self) -> list[str]:
        return [self.image] if self.image else list(self.images or [])

    def engine_item(self, with_images: bool = False) -> dict[str, Any]:
        """The slim record that travels through Ray Data (the rest stays on the driver); with
        ``with_images`` (a vision target's run: every row, so the column has one type) the
        image references the actor reads."""
        item: dict[str, Any] = {
            "index": self.index,
            "shard": self.shard,
            "prompt_ids": self.prompt_ids,
            "prompt_text": self.prompt_text,
        }
        if with_images:
            item["images"] = self.image_refs
        return item


@dataclass
class Generated:
    """What an engine returns for one request."""

    index: int
    text: str | None
    finish_reason: str | None  # "stop" | "length" | None on error
    response_tokens: int
    error: str | None = None
    token_ids: list[int] | None = None  # the response's ids, the EOS that ended it included
    topk_ids: Any = None  # (len(token_ids), k) int32 array: the target's top-k ids per token
    topk_logprobs: Any = None  # (len(token_ids), k) float32 array: their temperature-1 log-probs
    skipped: str | None = None  # why the row is left out (its image could not be read): a skip, not a failure


def shard_of(index: int, shard_size: int) -> int:
    return index // shard_size


def shard_file(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}.parquet"


def record_file(shard: int) -> str:
    return f"{RECORDS_DIR}/{SHARD_PREFIX}{shard:05d}.json"


def num_shards(num_rows: int, shard_size: int) -> int:
    return max(1, -(-num_rows // shard_size))


def safe_row_id(row: Any, index: int) -> str:
    """The row's id; a row too broken to hash gets its position."""
    try:
        return rowlib.row_id(row)
    except (TypeError, ValueError):
        return f"row-{index}"


def rewrite_messages(messages: list[dict[str, str]], reference: str) -> list[dict[str, str]]:
    """The conversation with its last user turn wrapped in the rewrite instruction."""
    last = messages[-1]
    wrapped = REWRITE_TEMPLATE.format(instruction=last["content"], reference=reference)
    return [*messages[:-1], {"role": last["role"], "content": wrapped}]


def render(messages: list[dict[str, str]], tokenizer, plain_prompt: str | None) -> str:
    """The prompt text for the engine (chat template when the tokenizer has one)."""
    row = {"messages": messages} if plain_prompt is None else {"prompt": plain_prompt}
    return rowlib.render_prompt(row, tokenizer)


def encode(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt (the conventions every stage shares)."""
    from sd2_ray.models.tokens import encode_rendered

    return encode_rendered(text, tokenizer)


def prepare_row(
    row: Any,
    index: int,
    shard: int,
    tokenizer,
    mode: str,
    max_prompt_tokens: int,
    vision: VisionTarget | None = None,
) -> tuple[Request | None, str | None]:
    """(request, None) for a usable row, else (None, why it was skipped). ``vision``: the
    target is a LLaVA model; its prompts get image tokens and image rows their references."""
    if not isinstance(row, dict):
        return None, f"row must be an object, got {type(row).__name__}"
    problem = rowlib.row_problem(row)
    if problem:
        return None, problem
    messages = rowlib.instruction_messages(row)
    if not messages:
        return None, "'messages' has no turn before the answer"
    reference = rowlib.reference_response(row)
    uses_messages = row.get("messages") is not None
    if mode == "rewrite":
        if reference is None:
            return None, "rewrite mode needs a reference 'response'"
        engine_messages, plain = rewrite_messages(messages, reference), None
    else:
        engine_messages, plain = messages, None if uses_messages else row["prompt"]
    fields: dict[str, Any] = {}
    if vision is None:
        text = render(engine_messages, tokenizer, plain)
        ids = encode(text, tokenizer)
    else:
        from sd2_ray.distill import image_rows

        problem = image_rows.image_problem(row)
        if problem:
            return None, problem
        fields = image_rows.resolved_fields(row, vision.base_dir)
        try:
            text, ids = image_rows.encode_prompt(
                engine_messages, plain, len(image_rows.refs_of(fields)), tokenizer, vision
            )
        except ValueError as err:
            return None, str(err)
    if len(ids) > max_prompt_tokens:
        return None, f"prompt has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}"
    return Request(
        index=index,
        shard=shard,
        id=safe_row_id(row, index),
        messages=messages if uses_messages else None,
        prompt=None if uses_messages else row["prompt"],
        reference=reference,
        prompt_text=text,
        prompt_ids=ids,
        category=rowlib.category_of(row),
        **fields,
    ), None


def prepare_rows(
    rows: list[Any],
    tokenizer,
    mode: str,
    max_prompt_tokens: int,
    shard_size: int,
    vision: VisionTarget | None = None,
) -> tuple[list[Request], list[dict[str, Any]]]:
    """Requests for the usable rows and ``{index, shard, id, reason}`` for the skipped ones (a
    row repeating an earlier id among them: one output row per id)."""
    requests, skipped = [], []
    repeated = rowlib.repeated_ids(rows)
    for index, row in enumerate(rows):
        shard = shard_of(index, shard_size)
        request, reason = (
            (None, rowlib.DUPLICATE_ID)
            if index in repeated
            else prepare_row(row, index, shard, tokenizer, mode, max_prompt_tokens, vision)
        )
        if request is None:
            skipped.append({"index": index, "shard": shard, "id": safe_row_id(row, index), "reason": reason})
        else:
            requests.append(request)
    return requests, skipped


def split_skipped(
    answered: list[tuple[Request, Generated]],
) -> tuple[list[tuple[Request, Generated]], list[dict[str, Any]]]:
    """A shard's answers without the rows an engine skipped (an image it could not read), and
    those rows as skip records, the same ``{index, shard, id, reason}`` the driver writes."""
    kept, skipped = [], []
    for request, generated in answered:
        if generated.skipped:
            skipped.append(
                {"index": request.index, "shard": request.shard, "id": request.id, "reason": generated.skipped}
            )
        else:
            kept.append((request, generated))
    return kept, skipped


def rewrite_problem(text: str | None, finish_reason: str | None, allow_truncated: bool) -> str | None:
    """Why a rewrite is not kept (the reference is kept instead), or None when it passes."""
    if text is None or not text.strip():
        return "empty"
    if finish_reason == "length" and not allow_truncated:
        return "truncated"
    lowered = text.lower()
    for phrase in LEAK_PHRASES:
        if phrase in lowered:
            return f"leaks the rewrite instruction ('{phrase}')"
    return None


def result_row(request: Request, generated: Generated, mode: str, allow_truncated: bool) -> dict[str, Any]:
    """The output row: ``response`` is what the drafter learns; ``source`` says whose it is.
    The token-level columns (``response_ids``, top-k) travel only with generated text."""
    response: str | None = generated.text
    source: str | None = DRAFTER if mode == "on-policy" else TARGET
    rejected = None
    if generated.error is not None:
        response, source = None, None
    elif mode == "rewrite":
        rejected = rewrite_problem(generated.text, generated.finish_reason, allow_truncated)
        if rejected:
            response, source = request.reference, REFERENCE
    generated_text = source in (TARGET, DRAFTER)
    return {
        "id": request.id,
        "index": request.index,
        "category": request.category,
        "messages": request.messages,
        "prompt": request.prompt,
        "response": response,
        "reference": request.reference,
        "source": source,
        "finish_reason": generated.finish_reason,
        "prompt_tokens": len(request.prompt_ids),
        "response_tokens": generated.response_tokens,
        "rejected": rejected,
        "error": generated.error,
        "response_ids": generated.token_ids if generated_text else None,
        "topk_ids": generated.topk_ids if generated_text else None,
        "topk_logprobs": generated.topk_logprobs if generated_text else None,
        "image": request.image,  # written only by a vision target's run (output_schema)
        "images": request.images,
    }


TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


def output_schema(top_k: int = 0, images: bool = False):
    """The row contract; the top-k columns exist only when ``logprobs_top_k`` > 0, the image
    reference columns (``image`` string, ``images`` list of strings; one set per image row,
    both null on a text row) only in a vision-language target's output."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [
        ("id", pa.string()),
        ("index", pa.int64()),
        ("category", pa.string()),
        ("messages", pa.list_(message)),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("reference", pa.string()),
        ("source", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("response_tokens", pa.int32()),
        ("rejected", pa.string()),
        ("error", pa.string()),
        ("response_ids", pa.list_(pa.int32())),
    ]
    if images:
        fields += [("image", pa.string()), ("images", pa.list_(pa.string()))]
    if top_k:
        fields += [("topk_ids", pa.list_(pa.list_(pa.int32()))), ("topk_logprobs", pa.list_(pa.list_(pa.float32())))]
    return pa.schema(fields)


def result_table(result_rows: list[dict[str, Any]], top_k: int = 0, images: bool = False):
    """A shard's rows (sorted by input position) as a pyarrow Table with the fixed schema. The
    top-k matrices are laid into Arrow arrays in bulk (no per-value Python objects)."""
    import pyarrow as pa

    ordered = sorted(result_rows, key=lambda r: r["index"])
    schema = output_schema(top_k, images)
    scalar = [{k: v for k, v in r.items() if k not in TOPK_COLUMNS} for r in ordered]
    table = pa.Table.from_pylist(scalar, schema=pa.schema([f for f in schema if f.name not in TOPK_COLUMNS]))
    for name in TOPK_COLUMNS if top_k else ():
        value_type = schema.field(name).type.value_type.value_type
        table = table.append_column(schema.field(name), nested_array([r.get(name) for r in ordered], top_k, value_type))
    return table


def nested_array(matrices: list[Any], k: int, value_type):
    """list<list<value_type>> from one (n_i, k) matrix (or None = null) per row."""
    import numpy as np
    import pyarrow as pa

    mats = [None if m is None else np.asarray(m).reshape(-1, k) for m in matrices]
    lengths = np.array([0 if m is None else m.shape[0] for m in mats], dtype=np.int32)
    dtype = value_type.to_pandas_dtype()
    flat = [m.astype(dtype, copy=False).ravel() for m in mats if m is not None]
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, dtype=dtype), type=value_type)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, values.__len__() + 1, k, dtype=np.int32)), values)
    outer_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    nulls = pa.array([m is None for m in mats])
    return pa.ListArray.from_arrays(outer_offsets, inner, mask=nulls)


def shard_record(
    shard: int, fingerprint: str, rows_in: int, result_rows: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> dict[str, Any]:
    """Counts written next to a finished shard (and gathered into manifest.json)."""
    failed = sum(1 for r in result_rows if r["error"] is not None)
    return {
        "shard": shard,
        "file": shard_file(shard),
        "fingerprint": fingerprint,
        "rows_in": rows_in,
        "rows_out": len(result_rows) - failed,
        "skipped": len(skipped),
        "bad_images": sum(1 for s in skipped if str(s.get("reason", "")).startswith(BAD_IMAGE_PREFIX)),
        "failed": failed,
        "from_target": sum(1 for r in result_rows if r["source"] == TARGET),
        "from_reference": sum(1 for r in result_rows if r["source"] == REFERENCE),
        "from_drafter": sum(1 for r in result_rows if r["source"] == DRAFTER),
        "response_tokens": sum(int(r["response_tokens"] or 0) for r in result_rows),
        "skipped_rows": skipped,
    }


def fingerprint(ids: list[str], settings: dict[str, Any]) -> str:
    """Identity of a shard's work: its input ids plus everything that changes its output."""
    blob = json.dumps({"ids": ids, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def read_distilled(path: str, include_failed: bool = False) -> list[dict[str, Any]]:
    """Rows of a distilled output directory (local or s3://), in input order; failed rows dropped
    unless asked for. For the prune / fine-tune stages."""
    files = [f for f in storage.list_files(path, suffix=".parquet") if storage.basename(f).startswith(SHARD_PREFIX)]
    out: list[dict[str, Any]] = []
    for file in files:
        out.extend(storage.read_parquet(file).to_pylist())
    if not include_failed:
        out = [r for r in out if r["error"] is None]
    return sorted(out, key=lambda r: r["index"])
