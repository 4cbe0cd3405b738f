"""A multi-node Ray cluster on this machine, built from a shipped cluster file.

Ray tests its autoscaler with the ``fake_multinode`` provider: the head's autoscaler launches extra
raylets on the same machine as "nodes". :func:`fake_cluster_config` turns
``clusters/aws-gpu.yaml``'s ``available_node_types`` into such a config (same worker node-type
names, the head's no-work rule, the same custom resources such as ``gen_node``/``train_node``,
min/max workers; CPUs and object store scaled down to fit a 2-core machine; GPUs
declared so Ray schedules by them while the work runs on CPU). :class:`FakeCluster` starts it
with ``ray start --head`` on free ports and stops it by its process group.

Ray's provider names the head ``ray.head.default`` whatever the file calls it, so the head
type is renamed; the worker types keep their names. The wheel lacks the provider's example
config (``ray.cluster_utils.AutoscalingCluster`` fails), hence this file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAKE_HEAD_TYPE = "ray.head.default"  # hard-coded by Ray's fake provider
MiB = 1024 * 1024


def _scaled(resources: dict[str, Any], cpus: float, store_mb: int) -> dict[str, Any]:
    """A worker type's resources, scaled to this machine: CPUs capped, a small object store (the
    default, 30 % of memory per raylet, would overcommit /dev/shm), GPUs and custom resources kept.
    (The fake provider passes ``memory`` on as a custom resource, which Ray refuses.)"""
    out = {k: v for k, v in resources.items() if k not in ("CPU", "memory", "object_store_memory")}
    out["CPU"] = min(float(resources.get("CPU", 0)), cpus)
    out["object_store_memory"] = store_mb * MiB
    return out


def fake_cluster_config(
    cluster_file: str | Path,
    gcs_port: int,
    cpus_per_node: float = 1,
    store_mb: int = 80,
    idle_timeout_minutes: float = 0.25,
    max_workers: dict[str, int] | None = None,
    min_workers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The fake-multinode autoscaler config for ``cluster_file``'s node types.

    ``max_workers`` / ``min_workers`` override a type's bounds (a 2-core machine holds a few
    raylets, not a cluster's worth)."""
    import yaml

    data = yaml.safe_load(Path(cluster_file).read_text())
    head = data["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in data["available_node_types"].items():
        if name == head:
            continue
        lo = (min_workers or {}).get(name, int(spec.get("min_workers", 0)))
        hi = (max_workers or {}).get(name, int(spec.get("max_workers", lo)))
        types[name] = {
            "resources": _scaled(spec.get("resources") or {}, cpus_per_node, store_mb),
            "node_config": {},
            "min_workers": min(lo, hi),
            "max_workers": hi,
        }
    head_resources = data["available_node_types"][head].get("resources") or {}
    types[FAKE_HEAD_TYPE] = {
        "resources": {k: v for k, v in head_resources.items() if k != "CPU"},
        "node_config": {},
        "max_workers": 0,
    }
    return {
        "cluster_name": "fake-" + str(data.get("cluster_name", "sd2")),
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": float(data.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "head_cpus": float(head_resources.get("CPU", 0)),
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while they are chosen)."""
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


@dataclass
class FakeCluster:
    """A fake multi-node cluster: ``start()``, then ``address`` (GCS) and ``dashboard`` (jobs)."""

    config: dict[str, Any]
    gcs_port: int
    env: dict[str, str] = field(default_factory=dict)
    temp_dir: str = ""
    proc: subprocess.Popen | None = None
    dashboard: str = ""
    joined: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def from_cluster_file(
        cls, cluster_file: str | Path, env: dict[str, str] | None = None, **overrides: Any
    ) -> FakeCluster:
        port = free_ports(1)[0]
        return cls(fake_cluster_config(cluster_file, port, **overrides), port, dict(env or {}))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout_s: float = 180) -> FakeCluster:
        import requests
        import yaml

        self.temp_dir = tempfile.mkdtemp(prefix="sd2f-", dir="/tmp")  # Unix socket paths stay short
        config = {k: v for k, v in self.config.items() if k != "head_cpus"}
        config_path = os.path.join(self.temp_dir, "autoscaler.yaml")
        Path(config_path).write_text(yaml.safe_dump(config))
        dashboard, *ports = free_ports(7)
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.config['head_cpus']:g}",
            "--num-gpus=0",
            f"--autoscaling-config={config_path}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--dashboard-agent-grpc-port={ports[1]}",
            f"--ray-client-server-port={ports[2]}",
            f"--metrics-export-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            "--object-store-memory=100000000",
        ]
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_AUTH_MODE": "disabled",
            "RAY_agent_register_timeout_ms": "180000",
            **self.env,
        }
        env.pop("RAY_ADDRESS", None)
        log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.dashboard}/api/version", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(self.temp_dir, "ray-start.log").read_text()[-1500:]
                self.stop()
                raise RuntimeError(f"fake cluster did not start: {tail}")
            time.sleep(1)

    def join_node(self, node_type: str) -> subprocess.Popen:
        """Start one more node of ``node_type`` by hand (``ray start --address``), outside the
        autoscaler: a test standing in for the cloud where this provider cannot replace a lost
        node (v1 keeps a fake node whose raylet died "pending" and counts it against the demand;
        a reclaimed cloud instance leaves the provider's list and is replaced)."""
        import json

        resources = dict(self.config["available_node_types"][node_type]["resources"])
        cpus, gpus = resources.pop("CPU", 0), resources.pop("GPU", 0)
        resources.pop("object_store_memory", None)
        ports = free_ports(5)
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            f"--address={self.address}",
            f"--num-cpus={cpus:g}",
            f"--num-gpus={gpus:g}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=80000000",
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--dashboard-agent-grpc-port={ports[1]}",
            f"--metrics-export-port={ports[2]}",
            f"--runtime-env-agent-port={ports[3]}",
            f"--node-manager-port={ports[4]}",
        ]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **self.env}
        env.pop("RAY_ADDRESS", None)
        log = open(os.path.join(self.temp_dir, f"join-{len(self.joined)}.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.joined.append(proc)
        return proc

    def stop(self) -> None:
        """Stop the head (``ray start --block`` stops its processes) and the fake nodes, whose
        raylets the autoscaler started in their own sessions, found by their temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for joined in self.joined:
            if joined.poll() is None:
                os.killpg(joined.pid, signal.SIGKILL)
        for pid in pids_of(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pids_of(marker: str, name: str = "") -> list[int]:
    """PIDs whose command line contains ``marker`` (e.g. a cluster's temp dir) and ``name``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and name in cmdline:
            out.append(int(entry))
    return out
