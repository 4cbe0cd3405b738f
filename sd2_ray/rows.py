"""Prompt and distilled-row datasets: reading, validating, ids, and rendering with a chat template.

Prompt rows (DESIGN.md): ``prompt`` (string) or ``messages`` (list of ``{role, content}``),
optional ``response`` (reference answer), optional ``id``, optional ``category`` (a task
category such as Spec-Bench's, reported on its own by eval). Missing ids are derived stably from
the content, so the same row gets the same id on every run and every machine. The id is every
stage's exactly-once key: a row that repeats an earlier row's id is skipped (:func:`repeated_ids`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sd2_ray import storage
from sd2_ray.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# In a directory only shards count: manifest.json and other metadata sit beside them.
SHARD_SUFFIXES = (".jsonl", ".parquet")
SKIPPED_FILE = "_skipped.jsonl"  # beside a stage's output: every row it left out, and why


def data_files(path: str) -> list[str]:
    """The JSONL/Parquet files of a dataset given as one file or a directory of shards."""
    if storage.is_file(path):
        return [path]
    if storage.is_dir(path):
        files = [
            f
            for f in storage.list_files(path, recursive=True)
            if f.endswith(SHARD_SUFFIXES) and "/_" not in f and "/." not in f
        ]
        if not files:
            raise DataError(f"{path}: directory has no .jsonl or .parquet files")
        return files
    raise DataError(f"{path}: dataset not found")


def _jsonl_lines(path: str) -> Iterable[tuple[int, str | None, str | None]]:
    """(1-based line number, text or None, problem or None) of every non-blank line. Lines end
    at "\n" only: a JSON string may hold U+2028 and other characters str.splitlines() would cut at;
    one line of invalid UTF-8 is that line's problem, not the file's."""
    data = storage.read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark, as some editors write
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as err:
            yield number, None, f"not UTF-8 text (byte {err.start} of the line)"


def read_jsonl(path: str, skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file. A line that is not a JSON object raises DataError naming
    the file and line, unless ``skipped`` is given: then it is recorded there and left out."""
    rows = []
    for number, line, problem in _jsonl_lines(path):
        if line is not None:  # decoded (then problem is None)
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as err:
                problem = f"invalid JSON ({err.msg})"
        if problem is None:
            rows.append(row)
        elif skipped is None:
            raise DataError(f"{path}: line {number}: {problem}")
        else:
            skipped.append({"file": path, "line": number, "id": None, "reason": problem})
    return rows


def read_rows(path: str, limit: int | None = None, skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """All rows of a JSONL/Parquet file or directory (local or s3://), in file order; unreadable
    JSONL lines go to ``skipped`` when it is given (see :func:`read_jsonl`)."""
    rows: list[dict[str, Any]] = []
    for file in data_files(path):
        if file.endswith(".parquet"):
            rows.extend(_read_parquet_rows(file))
        else:
            rows.extend(read_jsonl(file, skipped))
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


def _read_parquet_rows(file: str) -> list[dict[str, Any]]:
    try:
        return storage.read_parquet(file).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{file}: not a readable Parquet file ({str(err).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------- bad rows: count and skip


def skip_record(index: int, row: Any, reason: str) -> dict[str, Any]:
    """One skipped row for ``_skipped.jsonl``: where it was, its id if it has one, and why."""
    try:
        rid = row_id(row) if isinstance(row, dict) else None
    except (TypeError, ValueError):
        rid = None
    return {"index": index, "id": rid, "reason": reason}


def require_usable(source: str, kept: int, skipped: list[dict[str, Any]], min_share: float = 0.0) -> None:
    """The one policy for bad rows in every stage: they are counted and skipped, and the stage
    fails (DataError, exit 2) only when no rows, or less than ``min_share`` of them, remain."""
    total = kept + len(skipped)
    if kept and kept >= min_share * total:
        return
    example = ""
    if skipped:
        first = skipped[0]
        where = f"line {first['line']}" if first.get("line") else f"row {first.get('row') or first.get('index', 0) + 1}"
        where += f" (id '{first['id']}')" if first.get("id") else ""
        example = f"; e.g. {where}: {first['reason']}"
    if not kept:
        raise DataError(f"{source}: no usable rows ({len(skipped)} skipped{example})")
    raise DataError(
        f"{source}: only {kept} of {total} rows are usable, below the required share {min_share:g}{example}"
    )


def write_skipped(path: str, skipped: list[dict[str, Any]]) -> None:
    storage.write_text(path, "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in skipped))


def content_id(row: dict[str, Any]) -> str:
    """A stable id from the row's instruction (prompt or messages) and, for an image row, its
    image references as written: image rows often share one question ("Describe the image."),
    and rows about different images are different rows. A text row's id is as it always was."""
    key: Any = row.get("messages") if row.get("messages") is not None else row.get("prompt")
    images = {k: row[k] for k in ("image", "images") if row.get(k)}
    if images:
        key = {"instruction": key, **images}
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)
    return "h-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def row_id(row: dict[str, Any]) -> str:
    rid = row.get("id")
    return str(rid) if rid not in (None, "") else content_id(row)


def row_problem(row: dict[str, Any]) -> str | None:
    """Why a prompt row is unusable, or None when it is fine."""
    messages, prompt = row.get("messages"), row.get("prompt")
    if messages is None and prompt is None:
        return "row has neither 'prompt' nor 'messages'"
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, msg in enumerate(messages):
            if (
                not isinstance(msg, dict)
                or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)
            ):
                return f"'messages[{i}]' must be an object with string 'role' and 'content'"
    elif not isinstance(prompt, str) or not prompt.strip():
        return "'prompt' must be a non-empty string"
    response = row.get("response")
    if response is not None and not isinstance(response, str):
        return "'response' must be a string"
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        return "'category' must be a string"
    return None


def category_of(row: dict[str, Any]) -> str | None:
    """The row's task category, or None when it names none (a blank string names none)."""
    category = row.get("category")
    return (category.strip() or None) if isinstance(category, str) else None


DUPLICATE_ID = "duplicate id"  # the skip reason every stage gives a repeated id


def repeated_ids(rows: list[Any]) -> set[int]:
    """Positions of the rows whose id an earlier row already has: the id is the exactly-once key
    of every stage, so only the first row with an id counts, whether or not that row is usable.
    Rows that are not objects have no id to repeat."""
    seen: set[str] = set()
    repeated = set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        try:
            rid = row_id(row)
        except (TypeError, ValueError):
            continue
        if rid in seen:
            repeated.add(index)
        seen.add(rid)
    return repeated


def instruction_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to the assistant's turn (a plain prompt becomes one user message)."""
    if row.get("messages") is not None:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # a trailing answer is the reference, not part of the prompt
        return msgs
    return [{"role": "user", "content": row["prompt"]}]


def render_prompt(row: dict[str, Any], tokenizer) -> str:
    """Prompt text as the model sees it: the chat template with the generation prompt, when the
    tokenizer has one; else the raw prompt (completion-style models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(instruction_messages(row), tokenize=False, add_generation_prompt=True)
    if row.get("prompt") is not None:
        return row["prompt"]
    return "\n".join(m["content"] for m in instruction_messages(row)) + "\n"


def reference_response(row: dict[str, Any]) -> str | None:
    if isinstance(row.get("response"), str):
        return row["response"]
    msgs = row.get("messages") or []
    if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        return msgs[-1].get("content")
    return None
