"""A local-disk stand-in for the part of ``pyarrow.fs`` that sd2_ray's storage layer uses, for
the device smoke on a machine with torch and transformers only: pyarrow's wheel alone is
larger than what a device call may carry. Installed as ``pyarrow`` / ``pyarrow.fs`` only when
pyarrow cannot be imported; S3 and Parquet are not available through it (the smoke uses
neither), and the smoke's JSON names it in its ``imports`` stage."""

from __future__ import annotations

import enum
import os
import shutil
import sys
import types
from dataclasses import dataclass


class FileType(enum.IntEnum):
    NotFound = 0
    Unknown = 1
    File = 2
    Directory = 3


@dataclass
class FileInfo:
    path: str
    type: FileType
    size: int | None = None


@dataclass
class FileSelector:
    base_dir: str
    allow_not_found: bool = False
    recursive: bool = False


class _InputFile:
    """The random-access reader ``check_safetensors`` uses: size(), read(n)."""

    def __init__(self, path: str):
        self._f = open(path, "rb")

    def size(self) -> int:
        return os.fstat(self._f.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _info(path: str) -> FileInfo:
    if os.path.isdir(path):
        return FileInfo(path, FileType.Directory)
    if os.path.isfile(path):
        return FileInfo(path, FileType.File, os.path.getsize(path))
    return FileInfo(path, FileType.NotFound)


class LocalFileSystem:
    def get_file_info(self, what):
        if not isinstance(what, FileSelector):
            return _info(what)
        if not os.path.isdir(what.base_dir):
            if what.allow_not_found:
                return []
            raise FileNotFoundError(what.base_dir)
        walk = os.walk(what.base_dir) if what.recursive else [next(os.walk(what.base_dir))]
        return [_info(os.path.join(root, name)) for root, dirs, files in walk for name in dirs + files]

    def open_input_stream(self, path: str):
        return open(path, "rb")

    def open_input_file(self, path: str) -> _InputFile:
        return _InputFile(path)

    def delete_dir(self, path: str) -> None:
        shutil.rmtree(path)

    def delete_file(self, path: str) -> None:
        os.remove(path)


def copy_files(src: str, dst: str, source_filesystem=None, destination_filesystem=None) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True) if os.path.isdir(src) else shutil.copy2(src, dst)


def install_if_missing() -> bool:
    """Register this module as ``pyarrow.fs`` when pyarrow is absent; True when it did."""
    try:
        import pyarrow.fs  # noqa: F401

        return False
    except ImportError:
        pass
    package = types.ModuleType("pyarrow")
    package.STAND_IN = True
    package.__path__ = []
    package.fs = sys.modules[__name__]
    sys.modules["pyarrow"], sys.modules["pyarrow.fs"] = package, sys.modules[__name__]
    return True
