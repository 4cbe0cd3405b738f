"""``sd2 plan --config pipeline.yaml --cluster cluster.yaml``: every stage's Ray resources and
per-GPU memory, checked against the cluster's node types; ``sd2 run`` runs the same check first
when its config names a cluster. Exit 2 (a ConfigError) names the first stage that cannot fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sd2_ray.errors import ConfigError
from sd2_ray.pipeline.config import PipelineConfig
from sd2_ray.plan.cluster import NodeType, load_node_types
from sd2_ray.plan.config import PlanConfig
from sd2_ray.plan.estimate import OVERHEAD_GB, Need, finetune_need, prune_need, sharded_eval_need, vllm_need, weights_gb
from sd2_ray.plan.shapes import ModelShape, model_shape

log = logging.getLogger(__name__)
PROMPT_TOKENS = 2048  # prompt length assumed for eval KV caches (prompts are not read to plan)


@dataclass
class Placement:
    need: Need
    node: NodeType | None
    problem: str | None


def tune_needs(t, target: ModelShape, drafter: ModelShape, prefix: str = "tune.") -> list[Need]:
    """A search's trials: each prunes, fine-tunes and evaluates."""
    return [
        prune_need(f"{prefix}prune", drafter, t.prune),
        finetune_need(drafter, t.finetune, f"{prefix}finetune"),
        sharded_eval_need(
            f"{prefix}eval",
            target,
            drafter,
            t.eval_gpus,
            t.eval_dtype,
            t.eval_batch_size,
            PROMPT_TOKENS + t.eval_max_new_tokens,
        ),
    ]


def stage_needs(config: PipelineConfig) -> list[Need]:
    """What every stage of the run asks for, in run order."""
    target, drafter = model_shape(config.target), model_shape(config.drafter)
    needs = [distill_need(config, target), prune_need("prune", drafter, config.prune)]
    if "layer-pruned-sd" in config.drafter_names:
        from sd2_ray.pipeline.chain import layer_prune_config

        needs.append(prune_need("layer_prune", drafter, layer_prune_config(config, drop_layers=1)))
    needs.append(finetune_need(drafter, config.finetune))
    ev = config.eval
    needs.append(
        sharded_eval_need("eval", target, drafter, ev.gpus, ev.dtype, ev.batch_size, PROMPT_TOKENS + ev.max_new_tokens)
    )
    if config.tune is not None:
        needs += tune_needs(config.tune, target, drafter)
    needs.append(serve_need(config, target, drafter))
    return needs


def distill_need(config: PipelineConfig, target: ModelShape) -> Need:
    d = config.distill
    if d.engine == "vllm":
        return vllm_need(
            "distill",
            target,
            d.tensor_parallel_size,
            d.actors,
            d.dtype,
            d.model_len(target.context),
            float(d.vllm_engine_kwargs.get("gpu_memory_utilization", 0.9)),
        )
    need = Need(
        "distill", [{"CPU": d.cpus_per_actor, **({"GPU": d.gpus_per_actor} if d.gpus_per_actor else {})}] * d.actors
    )
    if d.gpus_per_actor:
        need.gpu_gb = {
            "weights": weights_gb(target, d.dtype),
            "KV cache": target.kv_bytes_per_token(2) * d.batch_size * (PROMPT_TOKENS + d.max_new_tokens) / 1e9,
        }
    return need


def serve_need(config: PipelineConfig, target: ModelShape, drafter: ModelShape) -> Need:
    s = config.serve
    if s.engine == "vllm":
        tp = getattr(s, "tensor_parallel_size", 1)
        return vllm_need(
            "serve",
            target,
            tp,
            1,
            s.dtype,
            int(s.max_model_len or target.context),
            float(getattr(s, "gpu_memory_utilization", 0.9)),
            drafter,
        )
    return sharded_eval_need(
        "serve",
        target,
        drafter,
        s.gpus_per_replica,
        s.dtype,
        s.max_batch_size,
        int(s.max_model_len or PROMPT_TOKENS + s.default_max_tokens),
    )


def on_its_node_type(need: Need, nodes: list[NodeType]) -> Need:
    """The stage's bundles with the marker of the node type it runs on (as `sd2 run` asks Ray
    for it: gen_node for distill/eval/serve, train_node for prune/fine-tune)."""
    from dataclasses import replace

    from sd2_ray.plan.cluster import stage_node_resources

    marker = stage_node_resources(nodes, need.stage.split(".")[-1].split(":")[0])
    return replace(need, bundles=[{**b, **marker} for b in need.bundles]) if marker else need


def place(need: Need, nodes: list[NodeType]) -> Placement:
    """The first node type that holds the stage's bundles (all on one node when STRICT_PACK;
    across up to max_workers nodes otherwise) with enough memory per GPU."""
    gpu = need.gpus_per_bundle
    candidates = [n for n in nodes if all(n.fits(b) for b in need.bundles)]
    if not candidates:
        return Placement(need, None, f"no node type has a bundle's {_bundle_text(need.bundles[0])}")
    for node in candidates:
        if need.strategy == "STRICT_PACK" and sum(b.get("GPU", 0) for b in need.bundles) > node.gpus:
            continue
        if gpu and need.per_gpu_gb > node.gpu_memory_gb * need.usable_fraction:
            continue
        per_node = int(node.gpus // gpu) if gpu else len(need.bundles)
        if gpu and -(-len(need.bundles) // max(per_node, 1)) > node.max_workers:
            continue
        return Placement(need, node, None)
    best = max(candidates, key=lambda n: n.gpu_memory_gb)
    if need.strategy == "STRICT_PACK" and sum(b.get("GPU", 0) for b in need.bundles) > best.gpus:
        return Placement(need, None, f"its {len(need.bundles)} GPUs must share one node; the largest has {best.gpus:g}")
    limit = best.gpu_memory_gb * need.usable_fraction
    return Placement(
        need, best, f"needs {need.per_gpu_gb:.1f} GB per GPU ({_breakdown(need)}) but {best.name} offers {limit:.1f} GB"
    )


def _bundle_text(bundle: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in bundle.items())


def _breakdown(need: Need) -> str:
    parts = ", ".join(f"{k} {v:.1f}" for k, v in need.gpu_gb.items())
    if need.load_gb > sum(need.gpu_gb.values()):
        parts = f"loading the whole model {need.load_gb:.1f} (training: {parts})"
    return parts + f", overhead {OVERHEAD_GB:.1f}"


def table(placements: list[Placement]) -> str:
    lines = ["| stage | bundles | node type | GB per GPU | fits | notes |", "|---|---|---|---|---|---|"]
    for p in placements:
        bundles = f"{len(p.need.bundles)} x {{{_bundle_text(p.need.bundles[0])}}}"
        if p.need.strategy == "STRICT_PACK":
            bundles += " STRICT_PACK"
        gb = (
            f"{p.need.per_gpu_gb:.1f} / {p.node.gpu_memory_gb * p.need.usable_fraction:.0f}"
            if p.need.gpu_gb and p.node
            else ("-" if not p.need.gpu_gb else f"{p.need.per_gpu_gb:.1f}")
        )
        lines.append(
            f"| {p.need.stage} | {bundles} | {p.node.name if p.node else '-'} | {gb} | "
            f"{'no' if p.problem else 'yes'} | {p.problem or p.need.note} |"
        )
    return "\n".join(lines)


def check(config, cluster: str | None = None) -> list[Placement]:
    """Place every stage of a pipeline (or a search's trials) on the cluster's node types;
    ConfigError naming the first that cannot."""
    path = cluster or config.cluster
    if not path:
        raise ConfigError("field 'cluster': sd2 plan needs a cluster YAML (--cluster clusters/aws-gpu.yaml)")
    nodes = load_node_types(path)
    if isinstance(config, PipelineConfig):
        needs = stage_needs(config)
    else:
        needs = tune_needs(config, model_shape(config.target), model_shape(config.drafter), prefix="")
    placements = [place(on_its_node_type(need, nodes), nodes) for need in needs]
    print(table(placements), flush=True)
    bad = next((p for p in placements if p.problem), None)
    if bad:
        raise ConfigError(f"{bad.need.stage}: {bad.problem} (cluster {path})")
    return placements


def load_planned(path: str):
    """The pipeline or search config at ``path`` (a search has `search_space`, a pipeline not)."""
    from sd2_ray.config import read_yaml
    from sd2_ray.tune.config import TuneConfig

    cls = TuneConfig if "search_space" in read_yaml(path) else PipelineConfig
    return cls.load(path)


def main(plan: PlanConfig) -> list[Placement]:
    config = load_planned(plan.config)
    placements = check(config, plan.cluster)
    print(f"sd2 plan: every stage fits {plan.cluster or config.cluster}")
    return placements
