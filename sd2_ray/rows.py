"""Prompt and distilled-row datasets: reading, validating, ids, and rendering with a chat template.

Prompt rows (DESIGN.md): ``prompt`` (string) or ``messages`` (list of ``{role, content}``),
optional ``response`` (reference answer), optional ``id``. Missing ids are derived stably from
the content, so the same row gets the same id on every run and every machine.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from sd2_ray import storage
from sd2_ray.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# In a directory only shards count: manifest.json and other metadata sit beside them.
SHARD_SUFFIXES = (".jsonl", ".parquet")


def data_files(path: str) -> list[str]:
    """The JSONL/Parquet files of a dataset given as one file or a directory of shards."""
    if storage.is_file(path):
        return [path]
    if storage.is_dir(path):
        files = [f for f in storage.list_files(path, recursive=True)
                 if f.endswith(SHARD_SUFFIXES) and "/_" not in f and "/." not in f]
        if not files:
            raise DataError(f"{path}: directory has no .jsonl or .parquet files")
        return files
    raise DataError(f"{path}: dataset not found")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in storage.iter_jsonl(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """All rows of a JSONL/Parquet file or directory (local or s3://), in file order."""
    rows: list[dict[str, Any]] = []
    for file in data_files(path):
        if file.endswith(".parquet"):
            rows.extend(storage.read_parquet(file).to_pylist())
        else:
            rows.extend(read_jsonl(file))
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


def content_id(row: dict[str, Any]) -> str:
    """A stable id from the row's instruction (prompt or messages)."""
    key = row.get("messages") if row.get("messages") is not None else row.get("prompt")
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False)
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
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                return f"'messages[{i}]' must be an object with string 'role' and 'content'"
    elif not isinstance(prompt, str) or not prompt.strip():
        return "'prompt' must be a non-empty string"
    response = row.get("response")
    if response is not None and not isinstance(response, str):
        return "'response' must be a string"
    return None


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
        return tokenizer.apply_chat_template(instruction_messages(row), tokenize=False,
                                             add_generation_prompt=True)
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


def with_ids(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, "id": row_id(row)} for row in rows]
