"""Submit a Ray job spec (jobs/specs/*.yaml) and resubmit it when it fails.

    python jobs/submit.py jobs/specs/run.yaml --address http://127.0.0.1:8265

Run it from the repository root (the specs' `working_dir: .` is uploaded from there).
A spec holds the keyword arguments of Ray's ``JobSubmissionClient.submit_job`` (entrypoint,
runtime_env, entrypoint_num_cpus, metadata, ...) plus two keys of ours:

- ``max_retries``: Ray's job submission API has no retry setting (its docstring: "Retries or
  different runs with different parameters should be handled by the submitter"), so this wrapper
  resubmits a FAILED job up to that many times. That is safe because every sd2 stage skips
  outputs whose manifest is complete: a resubmitted job resumes at the stage that died.
  On KubeRay the same role is played by the RayJob's ``backoffLimit`` (clusters/kuberay-rayjob.yaml).
- ``retry_delay_s``: seconds to wait before a resubmission (lets the autoscaler replace nodes).

The address comes from ``--address`` or ``RAY_ADDRESS`` (the dashboard, port 8265).
Exit code 0 when an attempt succeeded, 1 when every attempt failed or was stopped, 2 for a bad spec.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.config import read_yaml  # noqa: E402
from sd2_ray.errors import ConfigError  # noqa: E402

log = logging.getLogger("sd2.submit")

RETRY_KEYS = {"max_retries": 0, "retry_delay_s": 10.0}


def submit_job_parameters() -> set[str]:
    """The keyword arguments Ray's installed ``JobSubmissionClient.submit_job`` accepts."""
    from ray.job_submission import JobSubmissionClient

    params = inspect.signature(JobSubmissionClient.submit_job).parameters
    return {name for name in params if name != "self"}


def load_spec(path: str) -> tuple[dict[str, Any], int, float]:
    """(submit_job kwargs, max_retries, retry_delay_s) of a spec; unknown keys are one-line errors."""
    spec = read_yaml(path)
    retries = spec.pop("max_retries", RETRY_KEYS["max_retries"])
    delay = spec.pop("retry_delay_s", RETRY_KEYS["retry_delay_s"])
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(f"{path}: field 'max_retries': must be an integer >= 0, got {retries!r}")
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ConfigError(f"{path}: field 'retry_delay_s': must be a number >= 0, got {delay!r}")
    allowed = submit_job_parameters()
    for key in spec:
        if key not in allowed:
            raise ConfigError(
                f"{path}: field '{key}': not a submit_job argument "
                f"(allowed: {', '.join(sorted(allowed | set(RETRY_KEYS)))})"
            )
    if not spec.get("entrypoint"):
        raise ConfigError(f"{path}: field 'entrypoint': required")
    return spec, retries, float(delay)


def transient(err: Exception) -> bool:
    """Errors worth another try: the dashboard not reachable or not ready yet."""
    import requests

    return isinstance(err, (requests.RequestException, ConnectionError)) or "No available agent" in str(err)


def connect(address: str | None, patience_s: float = 120.0) -> Any:
    """A ``JobSubmissionClient``, retried while the dashboard does not answer yet."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception as err:
            if not transient(err) or time.monotonic() > deadline:
                raise
            log.info("dashboard at %s unreachable; retrying", address)
            time.sleep(2.0)


def submit_once(client: Any, kwargs: dict[str, Any], patience_s: float = 180.0) -> str:
    """``submit_job`` under a fixed submission id, retried while the job server is unreachable or
    not ready (a fresh cluster answers "No available agent to submit job" for a while). A retry
    first asks whether the lost request got through, so a job is never submitted twice."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "already exists" in str(err):  # our earlier request did get through
                return kwargs["submission_id"]
            if not transient(err) or time.monotonic() > deadline:
                raise
        except Exception as err:  # requests' errors
            if not transient(err) or time.monotonic() > deadline:
                raise
            log.info("job server unreachable (%s); retrying", str(err).splitlines()[0][:120])
        time.sleep(2.0)


def wait_for(client: Any, job_id: str, poll_s: float, patience_s: float = 300.0) -> Any:
    """Block until the job reaches a terminal status; dashboard hiccups shorter than
    ``patience_s`` are ridden out."""
    last_ok = time.monotonic()
    while True:
        try:
            status = client.get_job_status(job_id)
            last_ok = time.monotonic()
            if status.is_terminal():
                return status
        except Exception as err:
            if not transient(err) or time.monotonic() - last_ok > patience_s:
                raise
            log.info("status of %s unavailable (%s); retrying", job_id, str(err).splitlines()[0][:120])
        time.sleep(poll_s)


def submit_with_retries(
    client: Any, kwargs: dict[str, Any], max_retries: int, delay: float, poll_s: float = 2.0
) -> tuple[str, list[str]]:
    """Submit, wait, resubmit a failed job up to ``max_retries`` times: (last status, job ids)."""
    from ray.job_submission import JobStatus

    base_id = kwargs.get("submission_id") or f"sd2-{uuid.uuid4().hex[:8]}"
    job_ids: list[str] = []
    status = JobStatus.FAILED
    for attempt in range(max_retries + 1):
        metadata = {**(kwargs.get("metadata") or {}), "attempt": str(attempt)}
        job_id = submit_once(client, {**kwargs, "metadata": metadata, "submission_id": f"{base_id}-attempt{attempt}"})
        job_ids.append(job_id)
        log.info("submitted %s (attempt %d of %d)", job_id, attempt + 1, max_retries + 1)
        status = wait_for(client, job_id, poll_s)
        log.info("%s: %s", job_id, status)
        if status != JobStatus.FAILED:  # SUCCEEDED, or STOPPED by a user: never retried
            break
        if attempt < max_retries:
            time.sleep(delay)
    return JobStatus(status).value, job_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="see the module docstring for the spec format"
    )
    parser.add_argument("spec", help="job spec YAML (local or s3://)")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between status checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kwargs, retries, delay = load_spec(args.spec)
    except ConfigError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    client = connect(args.address)
    status, job_ids = submit_with_retries(client, kwargs, retries, delay, args.poll_s)
    print(f"{status} after {len(job_ids)} attempt(s): {' '.join(job_ids)}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
