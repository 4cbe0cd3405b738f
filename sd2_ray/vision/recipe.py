"""``sd2 massv``: MASSV drafters for a vision-language target, top to bottom. Layout under
``output`` (local or s3://)::

    distilled/                       the target VLM's answers to the image + question rows
    pruned/                          the drafter's LM, SparseGPT-pruned on those rows (massv-sd2)
    drafters/massv-projector/        phase 1: the projector learns image–caption pairs (LM frozen)
    drafters/massv/                  phase 2: projector + LM learn the distilled answers
    drafters/massv-sd2-projector/    the same two phases from the pruned LM, masks held
    drafters/massv-sd2/
    drafters/control-llava/, drafters/control/   tuned on the same answers without the images
    eval/<drafter>/report.json       each drafter decoding the held-out image prompts, same K
    report.json, report.md           the comparison

Every stage is the pipeline's own (Ray Data distill, Ray Train fine-tune) and skips what is
complete, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import logging
from typing import Any

from sd2_ray import storage
from sd2_ray.kit import with_kit_paths
from sd2_ray.vision.recipe_config import MassvRunConfig

log = logging.getLogger(__name__)


def main(config: MassvRunConfig) -> dict[str, Any]:
    report = run_massv(config)
    print(report_markdown(report))
    print(f"report: {storage.join(config.output, 'report.md')}")
    return report


def run_massv(config: MassvRunConfig) -> dict[str, Any]:
    config = with_kit_paths(config)
    distilled = distill(config)
    made = {name: make(config, name, distilled) for name in config.drafters}
    results: dict[str, dict] = {str(name): evaluate(config, name, drafter) for name, drafter in made.items()}
    report = comparison(results, config)
    storage.write_json(storage.join(config.output, "report.json"), report)
    storage.write_text(storage.join(config.output, "report.md"), report_markdown(report))
    return report


def distill(config: MassvRunConfig) -> str:
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.job import main as run_distill

    out = storage.join(config.output, "distilled")
    settings = config.distill.model_dump()
    run_distill(DistillConfig(target=config.target, prompts=config.train_prompts, output=out, **settings))
    return out


def prune(config: MassvRunConfig, distilled: str) -> str:
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import run_prune

    out = storage.join(config.output, "pruned")
    run_prune(PruneConfig(model=config.drafter, calibration=distilled, output=out, **config.prune.model_dump()))
    return out


def finetune(config: MassvRunConfig, model: str, data: str, name: str, massv: dict, phase1: bool = False) -> str:
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune

    out = storage.join(config.output, "drafters", name)
    settings = (config.projector if phase1 else config.instruct).model_dump(exclude={"massv", "seed"})
    run_finetune(FinetuneConfig(model=model, data=data, output=out, seed=config.seed, massv=massv, **settings))
    return out


def make(config: MassvRunConfig, name: str, distilled: str) -> str:
    """The model dir of one drafter of the comparison."""
    if name == "text-only":
        return config.drafter
    if name == "control":  # the text LM, tuned on the distilled answers with no image features
        from sd2_ray.vision.model import save_text_lm

        massv = {"phase": "instruct", "target": config.target, "images": False, "seed": config.seed}
        llava = finetune(config, config.drafter, distilled, "control-llava", massv)
        out = storage.join(config.output, "drafters", "control")
        if not storage.exists(storage.join(out, "config.json")):
            _publish_text_lm(llava, out, save_text_lm)
        return out
    text = prune(config, distilled) if name == "massv-sd2" else config.drafter
    phase1 = finetune(
        config,
        text,
        config.captions,
        f"{name}-projector",
        {"phase": "projector", "target": config.target, "seed": config.seed},
        phase1=True,
    )
    return finetune(config, phase1, distilled, name, {"phase": "instruct"})


def _publish_text_lm(llava: str, out: str, save_text_lm) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sd2-control-") as tmp:
        save_text_lm(storage.local_dir(llava), tmp)
        if storage.is_s3(out):
            storage.copy_dir(tmp, out)
        else:
            import shutil

            shutil.copytree(tmp, out, dirs_exist_ok=True)


def evaluate(config: MassvRunConfig, name: str, drafter: str) -> dict[str, Any]:
    from sd2_ray.evaluate.config import EvalConfig
    from sd2_ray.evaluate.job import main as run_eval

    out = storage.join(config.output, "eval", name)
    settings = config.eval.model_dump()
    eval_config = EvalConfig(
        target=config.target,
        drafter=drafter,
        prompts=config.eval_prompts,
        output=out,
        num_speculative_tokens=config.num_speculative_tokens,
        **settings,
    )
    run_eval(eval_config)
    return storage.read_json(storage.join(out, "report.json"))


def comparison(results: dict[str, dict], config: MassvRunConfig) -> dict[str, Any]:
    """Per drafter: MAL, acceptance by position, drafting MACs per token, vision MACs per image;
    and the ratios MASSV's claims are about."""
    rows = {
        name: {
            "mean_accepted_length": r["mean_accepted_length"],
            "acceptance_by_position": r.get("per_position_acceptance"),
            "drafter_macs_per_token": r["drafter_macs_per_token"],
            "vision": r.get("vision", {}),
        }
        for name, r in results.items()
    }
    mal = {n: r["mean_accepted_length"] for n, r in rows.items()}
    macs = {n: r["drafter_macs_per_token"] for n, r in rows.items()}
    ratios = {}
    if "massv" in mal and "text-only" in mal:
        ratios["massv_over_text_only"] = mal["massv"] / mal["text-only"]
    if "massv" in mal and "control" in mal:
        ratios["massv_over_control"] = mal["massv"] / mal["control"]
    if "massv" in mal and "massv-sd2" in mal:
        ratios["massv_sd2_over_massv"] = mal["massv-sd2"] / mal["massv"]
        ratios["massv_sd2_mac_cut"] = 1 - macs["massv-sd2"] / macs["massv"]
    return {"k": config.num_speculative_tokens, "seed": config.seed, "drafters": rows, "ratios": ratios}


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# MASSV drafters (K {report['k']}, seed {report['seed']})",
        "",
        "| drafter | MAL | drafting MACs / token | vision tower MACs / image | projector MACs / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["drafters"].items():
        vision = r["vision"] or {}
        tower = vision.get("vision_tower_macs_per_image", "—")
        projector = vision.get("drafter_projector_macs_per_image", "—")
        lines.append(
            f"| {name} | {r['mean_accepted_length']:.3f} | {r['drafter_macs_per_token']:,.0f} | "
            f"{tower if isinstance(tower, str) else f'{tower:,.0f}'} | "
            f"{projector if isinstance(projector, str) else f'{projector:,.0f}'} |"
        )
    if report["ratios"]:
        lines += ["", ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items())]
    return "\n".join(lines) + "\n"
