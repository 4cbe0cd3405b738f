"""DeepSpeed's JIT-built ops (the CPU shared-memory communication op) and their build locks.

torch builds an extension under ``$TORCH_EXTENSIONS_DIR/<name>/`` behind a ``lock`` file. A build
killed midway leaves the lock, and every later build of that op then waits on it forever without
a word. ``infra/install.sh`` builds the op at install time into a directory per virtualenv; a
fine-tune still finds a lock here, waits a bounded time for a live build to end, and otherwise
stops with a message that names the lock.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time

from sd2_ray.errors import Sd2Error

log = logging.getLogger(__name__)
LOCK_PATIENCE_S = 300.0  # a build takes 1-2 minutes on 2 cores


def extensions_dir() -> str:
    """``$TORCH_EXTENSIONS_DIR``, else this virtualenv's own folder (set here so every process of
    the run, workers included, uses it: two venvs sharing torch's default rebuild in turn)."""
    default = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", default)


def build_locks(root: str | None = None) -> list[str]:
    root = root or extensions_dir()
    return sorted(glob.glob(os.path.join(root, "**", "lock"), recursive=True))


def wait_for_build_locks(patience_s: float = LOCK_PATIENCE_S, poll_s: float = 2.0, root: str | None = None) -> None:
    """Return once no extension build lock is left; raise Sd2Error naming a lock that outlives
    ``patience_s`` (its build was killed; deleting it lets the next run build the op)."""
    deadline = time.monotonic() + patience_s
    announced = False
    while True:
        locks = build_locks(root)
        if not locks:
            return
        if time.monotonic() >= deadline:
            raise Sd2Error(
                f"{locks[0]}: a torch extension build lock is still held after {patience_s:.0f} s "
                "(a DeepSpeed op build was killed midway?); delete the lock file and rerun"
            )
        if not announced:
            log.warning(
                "waiting for %s: another process is building a DeepSpeed op (up to %.0f s)", locks[0], patience_s
            )
            announced = True
        time.sleep(poll_s)
