"""The node types a plan is checked against, from a Ray cluster launcher YAML
(``available_node_types``) or a KubeRay RayCluster / RayJob / RayService (``workerGroupSpecs``).
GPU memory comes from the instance type (``InstanceType`` or the
``node.kubernetes.io/instance-type`` node selector), or from a ``gpu_memory_gb`` resource."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sd2_ray.errors import ConfigError

# instance type -> (GPUs, GB of memory per GPU); AWS's published specifications
INSTANCE_GPUS = {
    "p4d.24xlarge": (8, 40),
    "p4de.24xlarge": (8, 80),
    "p5.48xlarge": (8, 80),
    "p5e.48xlarge": (8, 141),
    "p5en.48xlarge": (8, 141),
    "g6e.xlarge": (1, 48),
    "g6e.12xlarge": (4, 48),
    "g6e.24xlarge": (4, 48),
    "g6e.48xlarge": (8, 48),
    "g5.xlarge": (1, 24),
    "g5.12xlarge": (4, 24),
    "g5.48xlarge": (8, 24),
    "g6.12xlarge": (4, 24),
    "g6.48xlarge": (8, 24),
}


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    gpu_memory_gb: float
    max_workers: int
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"gen_node": 1}

    def fits(self, bundle: dict[str, float]) -> bool:
        custom = {k: v for k, v in bundle.items() if k not in STANDARD_RESOURCES}
        return (
            bundle.get("CPU", 0.0) <= self.cpus
            and bundle.get("GPU", 0.0) <= self.gpus
            and all(self.custom.get(k, 0.0) >= v for k, v in custom.items())
        )


# The custom resource marking the node type each stage is meant for (clusters/aws-gpu.yaml
# and the KubeRay manifests declare them): the target's generation nodes, the drafter's
# training nodes. A stage asks for a small share of its marker, so it lands on such a node.
STAGE_MARKERS = {
    "distill": "gen_node",
    "eval": "gen_node",
    "serve": "gen_node",
    "tune": "gen_node",
    "prune": "train_node",
    "layer_prune": "train_node",
    "finetune": "train_node",
}
MARKER_SHARE = 0.001
STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def stage_node_resources(types: list[NodeType], stage: str) -> dict[str, float]:
    """The custom resources ``stage`` asks for on a cluster of ``types``: its node type's marker
    when some type declares it, else none (any node will do)."""
    marker = STAGE_MARKERS.get(stage)
    if marker and any(marker in t.custom for t in types):
        return {marker: MARKER_SHARE}
    return {}


def placed(settings, types: list[NodeType], stage: str):
    """A stage's settings asking for its node type, unless they set node_resources themselves."""
    if "node_resources" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"node_resources": stage_node_resources(types, stage)})


def placed_search(tune, types: list[NodeType]):
    """A search's settings: trials prune and train on training nodes, evaluate on generation nodes."""
    return placed(tune, types, "tune").model_copy(
        update={"prune": placed(tune.prune, types, "prune"), "finetune": placed(tune.finetune, types, "finetune")}
    )


def _custom(resources: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if k not in STANDARD_RESOURCES and k != "gpu_memory_gb"}


def _gpu_memory(name: str, instance: str | None, resources: dict[str, Any]) -> float:
    if "gpu_memory_gb" in resources:
        return float(resources["gpu_memory_gb"])
    if instance in INSTANCE_GPUS:
        return float(INSTANCE_GPUS[instance][1])
    if float(resources.get("GPU", 0)) > 0:
        raise ConfigError(
            f"cluster node type '{name}': unknown GPU memory of instance type {instance!r} "
            f"(add a gpu_memory_gb resource)"
        )
    return 0.0


def launcher_node_types(data: dict[str, Any]) -> list[NodeType]:
    out = []
    for name, spec in (data.get("available_node_types") or {}).items():
        resources = spec.get("resources") or {}
        instance = (spec.get("node_config") or {}).get("InstanceType")
        out.append(
            NodeType(
                name,
                float(resources.get("CPU", 0)),
                float(resources.get("GPU", 0)),
                _gpu_memory(name, instance, resources),
                int(spec.get("max_workers", 1)),
                _custom(resources),
            )
        )
    return out


def kuberay_node_types(data: dict[str, Any]) -> list[NodeType]:
    spec = data.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    out = []
    for group in cluster.get("workerGroupSpecs") or []:
        pod = (group.get("template") or {}).get("spec") or {}
        limits = ((pod.get("containers") or [{}])[0].get("resources") or {}).get("limits") or {}
        instance = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
        gpus = float(limits.get("nvidia.com/gpu", 0))
        cpus = float(str(limits.get("cpu", 0)).rstrip("m") or 0)
        custom = _custom(_start_param_resources(group))
        out.append(
            NodeType(
                group["groupName"],
                cpus,
                gpus,
                _gpu_memory(group["groupName"], instance, {"GPU": gpus}),
                int(group.get("maxReplicas", 1)),
                custom,
            )
        )
    return out


def _start_param_resources(group: dict[str, Any]) -> dict[str, Any]:
    """A worker group's ``rayStartParams.resources``: JSON, itself quoted for the command line."""
    text = str((group.get("rayStartParams") or {}).get("resources") or "").strip()
    while text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text) if text else {}


def load_node_types(path: str) -> list[NodeType]:
    from sd2_ray.config import read_yaml

    data = read_yaml(path)
    types = launcher_node_types(data) if "available_node_types" in data else kuberay_node_types(data)
    if not types:
        raise ConfigError(f"{path}: no node types (available_node_types or workerGroupSpecs)")
    return types
