"""Device and dtype choices shared by eval, serve and the engine.

Config fields hold names (``device: auto|cpu|cuda|cuda:N``, ``dtype: auto|float32|bfloat16|
float16``); :func:`check_device_name` validates the spelling without importing torch (configs
are imported by ``sd2 --help``), and :func:`resolve_device` / :func:`resolve_dtype` turn names
into what torch uses *where the models are loaded* (a Ray worker may see GPUs the driver does not).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator

from sd2_ray.errors import ConfigError

DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]  # every config's dtype field
DTYPE_NAMES = get_args(DtypeName)


def check_device_name(value: str) -> str:
    """Validator body for a ``device`` field: auto, cpu, cuda or cuda:N."""
    value = str(value).strip()
    if not DEVICE_NAME.match(value):
        raise ValueError(f"'{value}' is not a device (auto, cpu, cuda or cuda:N)")
    return value


# the type of every config's device field: a checked name, resolved later where models load
DeviceName = Annotated[str, AfterValidator(check_device_name)]


def resolve_device(name: str = "auto", field: str = "device") -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; a CUDA device that this process
    cannot use is a ConfigError naming ``field``."""
    import torch

    name = check_device_name(name) if name else "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"field '{field}': {name} requested but CUDA is not available here "
                "(no GPU or a CPU-only torch build); use 'auto' or 'cpu'"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"field '{field}': {name} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return name


def resolve_dtype(name: str, device: str, field: str = "dtype"):
    """The torch dtype for a dtype name; ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"field '{field}': '{name}' is not one of {', '.join(DTYPE_NAMES)}")
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def input_device(model):
    """Where a model's inputs go: its input embeddings' device (also for a model sharded with
    an accelerate ``device_map``, whose first layers hold the embeddings)."""
    return model.get_input_embeddings().weight.device
