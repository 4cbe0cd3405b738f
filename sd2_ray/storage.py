"""One storage layer for local paths and ``s3://`` URIs.

Built on pyarrow's filesystems (the same objects Ray Data and Ray Train accept), honouring
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` so a loopback S3 server or MinIO works unchanged.
Writes are atomic per file (temp name, then rename; on S3 a single PUT), and a directory
output counts as finished only when its ``manifest.json`` says ``complete`` (see
:mod:`sd2_ray.manifest`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_PREFIX = "s3://"


def is_s3(path: str) -> bool:
    return str(path).startswith(S3_PREFIX)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    path = str(path).rstrip("/")
    if is_s3(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_timeout_s() -> float:
    """Seconds one S3 request may take ($SD2_S3_TIMEOUT_S, default 30): an unreachable endpoint
    fails in bounded time instead of retrying for minutes."""
    return float(os.environ.get("SD2_S3_TIMEOUT_S", "30"))


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, key_id: str | None, timeout_s: float) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "connect_timeout": min(timeout_s, 10.0),
        "request_timeout": timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        url = urlparse(endpoint)
        kwargs["endpoint_override"] = url.netloc or url.path
        kwargs["scheme"] = url.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current environment (endpoint, region, credentials)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(s3_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID"), s3_timeout_s())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    path = str(path)
    if is_s3(path):
        return s3_filesystem(), path[len(S3_PREFIX) :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


@contextmanager
def s3_errors(path: str) -> Iterator[None]:
    """An S3 failure (no credentials, endpoint unreachable, access denied) as one line naming the
    URL and the endpoint consulted; local errors pass through unchanged."""
    try:
        yield
    except OSError as err:
        if not is_s3(path) or isinstance(err, FileNotFoundError):
            raise
        from sd2_ray.errors import DataError

        where = s3_endpoint() or "AWS's default endpoint"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path}: S3 request failed (endpoint {where}; set AWS_ENDPOINT_URL and credentials, "
            f"or SD2_S3_TIMEOUT_S): {first}"
        ) from None


def _kind(path: str):
    fs, inner = filesystem(path)
    with s3_errors(path):
        return fs.get_file_info(inner).type


def exists(path: str) -> bool:
    return _kind(path) != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return _kind(path) == pafs.FileType.File


def is_dir(path: str) -> bool:
    return _kind(path) == pafs.FileType.Directory


def makedirs(path: str) -> None:
    if not is_s3(path):  # S3 has no directories; keys imply them
        os.makedirs(path, exist_ok=True)


def list_files(path: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted full paths (same scheme as ``path``) of the files under a directory."""
    fs, inner = filesystem(path)
    if _kind(path) != pafs.FileType.Directory:
        return []
    with s3_errors(path):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(suffix):
            out.append(S3_PREFIX + info.path if is_s3(path) else info.path)
    return sorted(out)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    try:
        with s3_errors(path), fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        from sd2_ray.errors import DataError

        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {err.start})") from None


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
    """Atomic write: readers see the old file, or the whole new one, never a prefix."""
    fs, inner = filesystem(path)
    if is_s3(path):
        with s3_errors(path), fs.open_output_stream(inner) as f:  # one PUT: published whole or not at all
            f.write(data)
        return
    os.makedirs(os.path.dirname(inner), exist_ok=True)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, inner)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def delete(path: str) -> None:
    """Remove a file or a whole directory/prefix; missing is fine."""
    fs, inner = filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two locations (local <-> s3)."""
    src_fs, src_inner = filesystem(src)
    dst_fs, dst_inner = filesystem(dst)
    makedirs(dst)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def write_parquet(path: str, table) -> None:
    """Write a pyarrow Table as one Parquet file, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


def read_parquet(path: str):
    """Read one Parquet file or a directory of shards into a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    return pq.read_table(inner, filesystem=fs)


def cache_root() -> str:
    return os.environ.get("SD2_CACHE_DIR") or os.path.join(Path.home(), ".cache", "sd2")


def local_dir(path: str, include: Sequence[str] | None = None) -> str:
    """A local directory holding ``path``'s files: itself if local, else a cached download.

    ``include``: ``fnmatch`` patterns of the relative file paths to fetch (e.g. only a model's
    config and tokenizer, not its weights); None fetches every file. Each (path, include) pair
    has its own cache entry, fresh while the remote file list and sizes are unchanged.

    Safe for concurrent callers (several actors on one node): one process downloads under a
    file lock into a temp folder renamed into place when whole; the others wait for the lock
    and then find the fresh copy. An interrupted download is never reused.
    """
    if not is_s3(path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such directory")
        return os.path.abspath(path)
    if not is_dir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    patterns = tuple(include) if include is not None else None
    target = cache_path(path, patterns)
    files = _listing(path, patterns)
    if _cache_is_fresh(files, target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _file_lock(target + ".lock"):
        files = _listing(path, patterns)
        if _cache_is_fresh(files, target):  # another process finished it while we waited
            return target
        tmp = tempfile.mkdtemp(prefix=".dl-", dir=os.path.dirname(target))
        try:
            _download(path, tmp, patterns, files)
            with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
                json.dump({"source": path, "include": patterns, "files": files}, f)
            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


SOURCE_FILE = ".sd2-source.json"


def cache_path(path: str, patterns: tuple[str, ...] | None = None) -> str:
    """Where :func:`local_dir` keeps ``path``'s files on every node (same cache root, same place):
    a process can name it before the files are there (e.g. for a server that downloads them)."""
    key_source = path.rstrip("/") + ("" if patterns is None else "\0" + "\0".join(patterns))
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "s3", f"{basename(path)}-{key}")


@contextmanager
def _file_lock(lock_path: str) -> Iterator[None]:
    import fcntl

    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def _download(path: str, dest: str, patterns: tuple[str, ...] | None, files: list[list]) -> None:
    if patterns is None:
        copy_dir(path, dest)
        return
    for rel, _size in files:
        src_fs, src_inner = filesystem(path + "/" + rel)
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        pafs.copy_files(src_inner, out, source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())


def replace_dir(new: str, target: str) -> None:
    """Move ``new`` to ``target``; a stale ``target`` is moved aside first (rename is atomic)."""
    if os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "dir"))
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _listing(path: str, patterns: tuple[str, ...] | None = None) -> list[list]:
    """[relative path, size] of the files under ``path`` (matching ``patterns`` if given)."""
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    files = sorted([i.path[len(inner) :].lstrip("/"), i.size] for i in infos if i.type == pafs.FileType.File)
    if patterns is None:
        return files
    return [f for f in files if any(fnmatch.fnmatchcase(f[0], p) for p in patterns)]


def _cache_is_fresh(files: list[list], target: str) -> bool:
    """The cached copy matches the remote file list and sizes (a changed prefix is re-downloaded)."""
    try:
        with open(os.path.join(target, SOURCE_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return saved.get("files") == files
