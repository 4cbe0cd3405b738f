"""Quiet, readable terminal output: our own log lines at INFO, the libraries' repeated chatter
(Ray Data's per-operator lines, Ray Train's state-API warnings, DeepSpeed's accelerator notice,
transformers' advice) at WARNING or above, in the driver and in every Ray worker."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers that repeat the same line many times per run; their warnings stay, their chatter goes.
CHATTY = (
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "ray.util",
    "ray.air",
    "deepspeed",
    "DeepSpeed",
    "transformers",
    "accelerate",
    "filelock",
    "urllib3",
    "botocore",
    "vllm",
)
# Warnings that say nothing actionable about a run of ours and repeat per worker.
SILENCED = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,  # no dashboard
    "ray.train.v2._internal.state.state_actor": logging.ERROR,
}
MESSAGE_FILTERS = (
    r".*`torch_dtype` is deprecated.*",
    r".*TypedStorage is deprecated.*",
    r".*pkg_resources is deprecated.*",
    # DeepSpeed's ZeRO calls torch's renamed collectives; once per call site and worker
    r".*`torch\.distributed\.\w+` is deprecated.*",
)


def setup_logging(verbose: bool = False) -> None:
    """The driver's logging: ``sd2_ray`` at INFO (DEBUG with ``-v``), libraries at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbose:
        os.environ["SD2_VERBOSE"] = "1"  # reaches the workers (runtime.worker_env)
    else:
        quiet_libraries()


def no_gpu_here() -> bool:
    """No NVIDIA device node: DeepSpeed would pick its CPU accelerator anyway (told so up front,
    it skips its warning in every process that imports it, transformers' imports included)."""
    return not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl")


def quiet_libraries() -> None:
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, level in SILENCED.items():
        logging.getLogger(name).setLevel(level)
    for pattern in MESSAGE_FILTERS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if no_gpu_here():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # transformers' and the hub's per-file bars ("Loading weights ..."), read when they import
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: its switch, not the environment
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook``: the same quieting in every worker process (their log
    lines reach the driver's terminal)."""
    if os.environ.get("SD2_VERBOSE") not in (None, "", "0"):
        return
    quiet_libraries()
