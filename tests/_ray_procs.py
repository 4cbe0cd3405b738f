"""Test support, not part of the package: processes of this machine's Ray sessions, for tests
that kill a worker the way a lost node or an OOM kill would (SIGKILL, no clean-up)."""

from __future__ import annotations

import os


def our_raylet_pid() -> int:
    """The raylet of the Ray this process is connected to (read by a task from its environment)."""
    import ray

    @ray.remote(num_cpus=0)
    def raylet_pid() -> int:
        return int(os.environ["RAY_RAYLET_PID"])

    return ray.get(raylet_pid.remote())


def ray_worker_pids(title: str, raylet_pid: int | None = None) -> list[int]:
    """PIDs of Ray worker processes whose title contains ``title`` (Ray names them
    ``ray::<Actor or task>``), only those of the given raylet's session when one is given:
    other Ray sessions may run on the same machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            if title not in cmdline or not cmdline.startswith("ray::"):
                continue
            if raylet_pid is not None:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"RAY_RAYLET_PID={raylet_pid}".encode() not in f.read().split(b"\0"):
                        continue
        except OSError:  # gone, or not ours to read
            continue
        pids.append(int(entry))
    return pids


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (a raylet's workers and agents are its children)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def kill_node_of(worker_pid: int) -> int:
    """SIGKILL the raylet that started ``worker_pid`` and every process it started (its workers
    and agents): the node is gone, as a reclaimed instance would be. Returns the raylet's PID."""
    import signal

    with open(f"/proc/{worker_pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    raylet = int(next(e for e in environ if e.startswith(b"RAY_RAYLET_PID=")).split(b"=", 1)[1])
    for pid in [*children_of(raylet), raylet]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return raylet
