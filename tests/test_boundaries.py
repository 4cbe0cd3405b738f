"""The pure-core / Ray-adapter rule, checked on the source: only the modules named below may
import Ray (at module or function level), and Ray's private modules are used in one named place.
A check of ``sys.modules`` after import would miss a function-level import; this reads the AST.

The same AST reading keeps the package's import graph acyclic: a function-level import still
names a dependency (it is only deferred to keep heavy imports lazy), so it counts as an edge."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd2_ray"
# module -> why it talks to Ray (each is a thin adapter over a pure core)
ADAPTERS = {
    "runtime.py": "ray.init, GPU tasks, remote errors: the one place Ray starts",
    "distill/ray_data.py": "Ray Data: requests through the engine actor pool or ray.data.llm's vLLM processor",
    "feature/stream.py": "Ray Data: target features from an actor pool, streamed to Ray Train",
    "feature/ray_worker.py": "Ray Train: a feature head's per-worker loop around the pure step",
    "vision/ray_worker.py": "Ray Train: a MASSV drafter's per-worker loop (image + text rows) around the pure step",
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


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``sd2_ray/kit/__init__.py`` -> ``sd2_ray.kit``; ``sd2_ray/kit/cache.py`` -> ``sd2_ray.kit.cache``."""
    return ".".join((root.name, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def package_imports(path: Path, known: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's own modules that ``path`` imports, at any nesting level, relative imports resolved.

    ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``; importing a package
    names its ``__init__`` only (its parents, which Python also runs, are not counted)."""
    name = module_name(path, root)
    # the package a relative import is resolved against: the module's own for an __init__.py
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {module_name(p, root): package_imports(p, known, root) for p in paths}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The components of more than one module (or a module importing itself), by Tarjan's
    algorithm, iterative so a deep import chain meets no recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def enter(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(graph[node]))))

    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        enter(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:  # node roots a component: pop it off the stack
                    component = set(stack[stack.index(node) :])
                    del stack[stack.index(node) :]
                    on_stack -= component
                    if len(component) > 1 or node in graph[node]:
                        found.append(component)
            elif nxt not in index:
                enter(nxt)
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return found


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """A shortest cycle from ``start`` back to it inside one component (breadth-first), as
    ``[start, ..., start]``."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & within):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no cycle in {sorted(within)}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Per component, a shortest cycle through each of its modules (each cycle once, written from
    its first module in sorted order): every module on a cycle is named in at least one."""
    found: list[list[str]] = []
    for component in strongly_connected(graph):
        for module in sorted(component):
            cycle = shortest_cycle(graph, module, component)[:-1]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            if cycle + cycle[:1] not in found:
                found.append(cycle + cycle[:1])
    return found


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


def test_import_graph_has_no_cycles():
    """Lower layers (config, errors, storage, the kit's naming) never import what is built on them."""
    found = cycles(import_graph())
    assert not found, "import cycles in sd2_ray:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


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


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


def test_the_graph_resolves_relative_lazy_and_submodule_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "sub/__init__.py": "from . import leaf\n",  # a submodule, relative to the package itself
            "sub/leaf.py": "def f():\n    from ..top import x\n",  # function level, two levels up
            "sub/other.py": "from pkg.sub import leaf, name\nimport pkg.sub\n",  # leaf: module; name: __init__
            "top.py": "import os\nx = 1\n",
        },
    )
    assert import_graph(root) == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.sub.other": {"pkg.sub", "pkg.sub.leaf"},
        "pkg.top": set(),
    }


def test_the_graph_check_names_each_cycle(tmp_path):
    root = _package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": "def f():\n    import pkg.a\n",  # a lazy import closes the cycle all the same
            "c.py": "from .d import y\n",
            "d.py": "from .e import z\n",
            "e.py": "from .c import w\nfrom .a import v\n",
        },
    )
    assert [" -> ".join(c) for c in cycles(import_graph(root))] == [
        "pkg.a -> pkg.b -> pkg.a",
        "pkg.c -> pkg.d -> pkg.e -> pkg.c",
    ]
