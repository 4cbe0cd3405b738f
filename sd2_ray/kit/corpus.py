"""The kit's text: the local Python standard library's source, split into train / held-out files.

Every machine with this Python has the same files, so the kit is reproducible without any
download; the sorted (path, size) listing goes into the content hash, so another Python
(another stdlib) builds another kit.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache

# Dirs skipped because they are not representative Python prose/code (test suites are huge
# and repetitive, encodings are character tables, site-packages differs per install).
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "lib-dynload",
}
MAX_FILE_BYTES = 150_000  # one giant file would dominate a small corpus


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@lru_cache(maxsize=4)
def _listing(root: str) -> tuple[tuple[str, int], ...]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if 200 <= size <= MAX_FILE_BYTES:
                out.append((os.path.relpath(path, root), size))
    return tuple(sorted(out))


def stdlib_listing() -> list[tuple[str, int]]:
    """Sorted (relative path, size) of the stdlib .py files the kit may use."""
    return list(_listing(stdlib_root()))


def _rank(rel: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


@dataclass
class Corpus:
    root: str
    train_files: list[str] = field(default_factory=list)
    heldout_files: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)

    def train_texts(self) -> list[str]:
        return [self.texts[f] for f in self.train_files]

    def heldout_texts(self) -> list[str]:
        return [self.texts[f] for f in self.heldout_files]

    def stats(self) -> dict:
        return {
            "stdlib": self.root,
            "train_files": len(self.train_files),
            "heldout_files": len(self.heldout_files),
            "train_chars": sum(len(t) for t in self.train_texts()),
            "heldout_chars": sum(len(t) for t in self.heldout_texts()),
        }


def load_corpus(max_chars: int, heldout_fraction: float, seed: int) -> Corpus:
    """Held-out files chosen by a seeded hash of their path; train files taken in seeded order
    up to ``max_chars`` (the held-out side is capped at a quarter of that)."""
    root = stdlib_root()
    order = sorted(stdlib_listing(), key=lambda item: _rank(item[0], seed))
    cutoff = int(heldout_fraction * 2**32)
    corpus = Corpus(root=root)
    budget = {"train": max_chars, "heldout": max(max_chars // 4, 10_000)}
    for rel, _size in order:
        side = "heldout" if int(_rank(rel, seed + 1)[:8], 16) < cutoff else "train"
        if budget[side] <= 0:
            continue
        text = _read(os.path.join(root, rel))
        if text is None:
            continue
        corpus.texts[rel] = text
        (corpus.heldout_files if side == "heldout" else corpus.train_files).append(rel)
        budget[side] -= len(text)
    return corpus


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None
