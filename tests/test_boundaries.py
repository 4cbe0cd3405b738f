"""The pure-core / Ray-adapter rule, checked on the source: only the modules named below may
import Ray (at module or function level), and Ray's private modules are used in one named place.
A check of ``sys.modules`` after import would miss a function-level import; this reads the AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd2_ray"
# module -> why it talks to Ray (each is a thin adapter over a pure core)
ADAPTERS = {
    "runtime.py": "ray.init, GPU tasks, remote errors: the one place Ray starts",
    "distill/ray_data.py": "Ray Data: requests through the engine actor pool or ray.data.llm's vLLM processor",
    "finetune/ray_train.py": "Ray Train: dataset + TorchTrainer",
    "finetune/ray_worker.py": "Ray Train: the per-worker loop around the pure step",
    "serve/app.py": "Ray Serve deployment of our engine",
    "serve/job.py": "Ray Serve start/stop for `sd2 serve`",
    "serve/smoke.py": "Ray Serve: the pipeline's served-pair check",
    "serve/vllm_app.py": "ray.serve.llm deployment of vLLM",
    "serve/vllm_callbacks.py": "ray.serve.llm node-init hook fetching an s3:// drafter",
    "tune/cache.py": "a Ray actor serialising pruning per cache key",
    "tune/callbacks.py": "Ray Train -> Ray Tune reports",
    "tune/driver.py": "Ray Tune Tuner + ASHA",
    "tune/orphans.py": "a Tune callback removing placement groups a stopped trial left",
    "tune/trial.py": "one Ray Tune trial",
    "testing/serve_load.py": "test helper: replica counts from Serve's status",
}
# module -> private Ray modules it may use, and why there is no public way
PRIVATE = {
    "serve/vllm_app.py": {
        "ray.llm._internal.serve.core.configs.openai_api_models": (
            "the /v1/models card Ray's own build_openai_app builds; not exported"
        )
    },
    "serve/vllm_callbacks.py": {
        "ray.llm._internal.common.callbacks.base": "LLMConfig.callback_config's base class (its only documented form)"
    },
}
PRIVATE_PREFIXES = ("ray._private", "ray.llm._internal")


def ray_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of Ray in a file, at any nesting level."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "ray"]
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ray" and node.level == 0
        ):
            found.append((node.lineno, node.module))
    return found


def private_uses(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of Ray private modules named in imports or attribute chains."""
    uses = [(line, mod) for line, mod in ray_imports(path) if mod.startswith(PRIVATE_PREFIXES)]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and dotted.startswith(PRIVATE_PREFIXES):
                uses.append((node.lineno, dotted))
    return uses


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_named_adapters_import_ray():
    leaks = [
        f"{p.relative_to(PACKAGE)}:{line}: imports {mod}"
        for p in modules()
        if str(p.relative_to(PACKAGE)) not in ADAPTERS
        for line, mod in ray_imports(p)
    ]
    assert not leaks, "Ray outside the adapters:\n" + "\n".join(leaks)


def test_every_named_adapter_exists_and_uses_ray():
    for name in ADAPTERS:
        assert ray_imports(PACKAGE / name), f"{name} is listed as an adapter but does not use Ray"


def test_private_ray_only_where_named():
    leaks = []
    for path in modules():
        name = str(path.relative_to(PACKAGE))
        for line, dotted in private_uses(path):
            if not any(dotted.startswith(allowed) for allowed in PRIVATE.get(name, {})):
                leaks.append(f"{name}:{line}: {dotted}")
    assert not leaks, "private Ray modules used:\n" + "\n".join(leaks)


def test_pure_modules_pull_in_no_ray_vllm_or_deepspeed():
    """Importing every non-adapter module loads none of the heavy runtimes (they stay lazy, in
    the functions that need them): the configs, the CLI's help and the pure cores stay light."""
    import subprocess
    import sys

    names = [
        ".".join(("sd2_ray", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for p in modules()
        if str(p.relative_to(PACKAGE)) not in ADAPTERS
    ]
    code = (
        f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n"
        "print(','.join(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import ray\n", [(1, "ray")]),
        ("def f():\n    from ray import train\n", [(2, "ray")]),
        ("def f():\n    import ray.data as rd\n", [(2, "ray.data")]),
        ("from .ray_worker import x\nimport rayon\n", []),
    ],
)
def test_the_check_sees_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert ray_imports(path) == expected


def test_the_check_sees_private_attribute_chains(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import ray\nmode = ray._private.worker.global_worker.mode\n")
    assert (2, "ray._private.worker.global_worker.mode") in private_uses(path)
