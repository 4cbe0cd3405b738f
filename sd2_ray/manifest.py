"""``manifest.json``: what a stage output holds and whether it is finished.

A stage writes ``status: running`` before it starts producing files and ``complete`` last,
after every other file is in place. Anything else (missing, ``running``, ``failed``) is
unfinished: a rerun resumes or redoes it and never trusts it.
"""

from __future__ import annotations

import time
from typing import Any

from sd2_ray import storage

MANIFEST = "manifest.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


def path_of(out_dir: str) -> str:
    return storage.join(out_dir, MANIFEST)


def read(out_dir: str) -> dict[str, Any] | None:
    path = path_of(out_dir)
    if not storage.exists(path):
        return None
    try:
        data = storage.read_json(path)
    except ValueError:
        return None  # a torn or hand-edited manifest is an unfinished output
    return data if isinstance(data, dict) else None


def is_complete(out_dir: str) -> bool:
    data = read(out_dir)
    return data is not None and data.get("status") == COMPLETE


def write(out_dir: str, stage: str, status: str, **fields: Any) -> dict[str, Any]:
    """Write the manifest, keeping fields from an earlier write (``created_at`` and the rest)."""
    previous = read(out_dir) or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = {**previous, **fields, "stage": stage, "status": status, "updated_at": now}
    data.setdefault("created_at", now)
    storage.write_json(path_of(out_dir), data)
    return data


def start(out_dir: str, stage: str, **fields: Any) -> dict[str, Any]:
    return write(out_dir, stage, RUNNING, **fields)


def complete(out_dir: str, stage: str, **fields: Any) -> dict[str, Any]:
    return write(out_dir, stage, COMPLETE, **fields)


def fail(out_dir: str, stage: str, error: str, **fields: Any) -> dict[str, Any]:
    return write(out_dir, stage, FAILED, error=error, **fields)
