"""``sd2 <command>``: parse flags, load the stage config, dispatch. Nothing else lives here.

Every command takes ``--config FILE.yaml``, flags generated from its config's top-level
fields (``--num-speculative-tokens 4``), and ``key=value`` overrides for nested fields
(``sampling.temperature=0.7``). Precedence: overrides > flags > file > defaults.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

from sd2_ray.errors import Sd2Error


@dataclass(frozen=True)
class Command:
    config: str  # "module:Class" of the stage config
    runner: str  # "module:function" taking the config
    help: str
    section: str  # the section of a pipeline YAML this command reads when given one
    config_is_input: bool = False  # --config names the file the command works on, not its settings


COMMANDS: dict[str, Command] = {
    "kit": Command(
        "sd2_ray.kit.config:KitConfig",
        "sd2_ray.kit.build:main",
        "build the embedded model kit (trained tiny target, drafters, prompts)",
        "kit",
    ),
    "distill": Command(
        "sd2_ray.distill.config:DistillConfig",
        "sd2_ray.distill.job:main",
        "self-data distillation: the target regenerates responses (Ray Data)",
        "distill",
    ),
    "prune": Command(
        "sd2_ray.prune.config:PruneConfig",
        "sd2_ray.prune.job:main",
        "one-shot pruning: SparseGPT, Wanda, magnitude, N:M, or layer pruning",
        "prune",
    ),
    "finetune": Command(
        "sd2_ray.finetune.config:FinetuneConfig",
        "sd2_ray.finetune.job:main",
        "masked sparse fine-tuning on Ray Train + DeepSpeed ZeRO",
        "finetune",
    ),
    "massv": Command(
        "sd2_ray.vision.recipe_config:MassvRunConfig",
        "sd2_ray.vision.recipe:main",
        "MASSV multimodal drafters for a vision-language target (text-only, control, massv, massv-sd2)",
        "massv",
    ),
    "tune": Command(
        "sd2_ray.tune.config:TuneConfig",
        "sd2_ray.tune.job:main",
        "Ray Tune (ASHA) search over sparsity x learning rate by measured acceptance",
        "tune",
    ),
    "eval": Command(
        "sd2_ray.evaluate.config:EvalConfig",
        "sd2_ray.evaluate.job:main",
        "speculative decoding eval: MAL, acceptance, MACs, speedup, losslessness",
        "eval",
    ),
    "serve": Command(
        "sd2_ray.serve.config:ServeConfig",
        "sd2_ray.serve.job:main",
        "OpenAI-compatible endpoint (Ray Serve) for target + drafter",
        "serve",
    ),
    "run": Command(
        "sd2_ray.pipeline.config:PipelineConfig",
        "sd2_ray.pipeline.run:main",
        "the whole SD2 pipeline as one job, with baselines and a report",
        "",
    ),
    "plan": Command(
        "sd2_ray.plan.config:PlanConfig",
        "sd2_ray.plan.job:main",
        "Ray resources and per-GPU memory of every stage, checked against --cluster",
        "",
        config_is_input=True,
    ),
}
DEBUG_ENV = "SD2_DEBUG"


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _scalar_fields(config_cls: Any) -> dict[str, Any]:
    """Top-level fields that make sense as flags (scalars, optionals of scalars, literals)."""
    from pydantic import BaseModel

    out = {}
    for name, field in config_cls.model_fields.items():
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = typing.get_origin(ann) in (typing.Union, types.UnionType)
        base = args[0] if optional and len(args) == 1 else ann
        if isinstance(base, type) and issubclass(base, BaseModel):
            continue
        if typing.get_origin(base) is dict:
            continue
        out[name] = field
    return out


def _add_command(sub: Any, name: str, cmd: Command) -> None:
    config_cls = _load(cmd.config)
    p = sub.add_parser(
        name,
        help=cmd.help,
        description=inspect.cleandoc(config_cls.__doc__ or cmd.help),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (local or s3://); flags override it")
    for field_name, field in _scalar_fields(config_cls).items():
        if cmd.config_is_input and field_name == "config":
            continue  # that is --config itself
        flag = "--" + field_name.replace("_", "-")
        desc = (field.description or "").rstrip(".").replace("%", "%%")  # argparse formats help with %
        if field.is_required():
            hint = " (required)"
        elif field.default not in (None, "") and field.default_factory is None:
            hint = f" (default: {field.default})"
        else:
            hint = ""
        if field.annotation is bool:  # `--overwrite` alone means true; `--overwrite false` works too
            p.add_argument(
                flag, dest=f"flag__{field_name}", nargs="?", const="true", metavar="BOOL", help=f"{desc}{hint}"
            )
        else:
            p.add_argument(flag, dest=f"flag__{field_name}", metavar=field_name.upper(), help=f"{desc}{hint}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any (nested) field")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help=f"full tracebacks for errors (or {DEBUG_ENV}=1)")
    p.set_defaults(_command=name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd2",
        description="sd2-ray: Self-Distilled Sparse Drafters on Ray. Run `sd2 <command> --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in COMMANDS.items():
        _add_command(sub, name, cmd)
    return parser


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_ray.config import parse_override

    values = {}
    for key, raw in vars(args).items():
        if key.startswith("flag__") and raw is not None:
            values[key[len("flag__") :]] = parse_override(f"x={raw}")[1] if raw != "" else ""
    return values


def looks_like_pipeline(data: dict[str, Any], config_cls: Any) -> bool:
    """A pipeline YAML given to a stage command: its keys are a pipeline config's, not the stage's."""
    from sd2_ray.pipeline.config import PipelineConfig

    keys = set(data)
    return bool(keys) and keys <= set(PipelineConfig.model_fields) and not keys <= set(config_cls.model_fields)


def load_config(name: str, args: argparse.Namespace) -> Any:
    """The command's config: file < $SD2_OVERRIDES < flags < key=value overrides; every local path
    made absolute and every kit: name resolved before anything runs."""
    from sd2_ray.config import env_overrides, parse_override, read_yaml
    from sd2_ray.kit import with_kit_paths

    cmd = COMMANDS[name]
    config_cls = _load(cmd.config)
    overrides = dict(parse_override(o) for o in env_overrides())
    overrides.update(_flag_values(args))
    overrides.update(dict(parse_override(o) for o in args.overrides))
    if cmd.config_is_input:
        return config_cls.load(None, {**overrides, **({"config": args.config} if args.config else {})})
    data = read_yaml(args.config) if args.config else {}
    if cmd.section and looks_like_pipeline(data, config_cls):
        # A pipeline YAML: this stage's section, chained to the others as `sd2 run` would.
        from sd2_ray.pipeline.chain import stage_from_pipeline

        return with_kit_paths(stage_from_pipeline(args.config, cmd.section, overrides))
    section = cmd.section if cmd.section and cmd.section in data else None
    return with_kit_paths(config_cls.load(args.config, overrides, section=section))


def _debug(args: argparse.Namespace) -> bool:
    import os

    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from sd2_ray.logs import setup_logging

    setup_logging(verbose=args.verbose)
    try:
        config = load_config(args.command, args)
        _load(COMMANDS[args.command].runner)(config)
    except (Sd2Error, FileNotFoundError) as err:
        if _debug(args):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sd2 {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sd2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
