"""The entry points users take, as they take them: the README's main command verbatim (read from
README.md) in a fresh copy of the repository with its relative paths, killed during fine-tuning
and run again; the tiny job spec submitted with jobs/submit.py to a real `ray start --head`
cluster; every shipped job spec's runtime env merged with the driver's as Ray would.

The kit is the machine's cached one (``SD2_KIT_DIR``) and ``SD2_OVERRIDES`` gives the run a
smaller budget: the command line itself is the README's, unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sd2_ray import manifest

REPO = Path(__file__).resolve().parents[1]
SMALL = (
    "distill.limit=64 finetune.epochs=8 finetune.max_steps=48 finetune.checkpoint_every=8 eval.max_prompts=16 "
    "eval.max_new_tokens=32"
)
ALL = ["dense", "dense-sd", "layer-pruned-sd", "sd2", "sparse-sft", "uag"]
REQUIRED = (
    "name",
    "mean_accepted_length",
    "per_position_acceptance",
    "drafter_macs_per_token",
    "cost_coefficient",
    "predicted_speedup",
    "measured_speedup",
)

pytestmark = pytest.mark.ray


def readme_main_command() -> str:
    """The first command of the README's "Two commands" section, exactly as written there."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Two commands.*?(?=^## )", text, re.S | re.M).group(0)
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored: what a clone of this change holds)
    copied to ``dest``, with ``.venv`` pointing at the virtualenv running this test."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    os.symlink(sys.prefix, dest / ".venv")
    return dest


def user_env(kit_dir: str, clone: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SD2_KIT_DIR": kit_dir,
        "SD2_OVERRIDES": SMALL,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(clone),
    }  # the copy's code, not the checkout the venv was installed from
    env.pop("RAY_ADDRESS", None)
    return env


def registered_checkpoint(out: Path) -> Path | None:
    """A fine-tune under ``out`` whose Ray Train run has registered an intermediate checkpoint
    and not yet its final one (so a kill now interrupts training)."""
    for snapshot in out.glob("drafters/*/_checkpoints/*/checkpoint_manager_snapshot.json"):
        text = snapshot.read_text()
        if "step-" in text and '"final"' not in text:
            return snapshot.parents[2]
    return None


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            return None
        time.sleep(0.1)  # a kit fine-tune step takes ~0.1 s: look often
    return None


def test_readme_main_command_in_a_fresh_clone_survives_a_kill(kit_dir, tmp_path):
    command = readme_main_command()
    assert command == "bash infra/install.sh && .venv/bin/sd2 run --config jobs/configs/tiny.yaml"
    clone = fresh_copy(tmp_path / "clone")
    env = user_env(kit_dir, clone)
    out = clone / "out" / "tiny"  # tiny.yaml's relative output, relative to where the user stands
    first = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed = wait_for(lambda: registered_checkpoint(out), first, 900)
        assert killed, f"never reached a fine-tuning checkpoint: {first.stderr.read()[-3000:] if first.poll() else ''}"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert manifest.read(str(killed))["status"] == manifest.RUNNING  # the kill landed during fine-tuning
    snapshot = next(killed.glob("_checkpoints/*/checkpoint_manager_snapshot.json")).read_text()
    # rare: the last steps ran between check and kill (Ray Train persists the final checkpoint
    # before its snapshot names it, so a kill in between leaves a final checkpoint to publish)
    finished_before_the_kill = '"final"' in snapshot or any(killed.glob("_checkpoints/*/final/train_state.json"))
    distilled = manifest.read(str(out / "distilled"))
    assert distilled["status"] == manifest.COMPLETE and not manifest.is_complete(str(out))

    # one stream, as a terminal shows it: the closing line must be the last thing the user sees
    second = subprocess.run(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
    )
    assert second.returncode == 0, second.stdout[-3000:]
    assert manifest.read(str(out / "distilled"))["updated_at"] == distilled["updated_at"]  # not redone
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["restarts"] >= 1 or finished_before_the_kill  # continued from its checkpoint
    report = json.loads((out / "report" / "report.json").read_text())
    assert [d["name"] for d in report["drafters"]] == ALL
    for entry in report["drafters"]:
        assert all(entry.get(k) is not None for k in REQUIRED), entry
        assert 1.0 <= entry["mean_accepted_length"] <= 5.0 and entry["lossless"] is True, entry["name"]
        assert entry["drafter"].startswith("/"), "manifests and reports record absolute paths"
    by = {d["name"]: d for d in report["drafters"]}
    assert by["sd2"]["drafter_macs_per_token"] < by["dense"]["drafter_macs_per_token"]
    assert by["uag"]["cross_tokenizer"] is True
    smoke = json.loads((out / "serve_smoke.json").read_text())
    assert smoke["ok"] and smoke["usage"]["completion_tokens"] > 0
    last = [line for line in second.stdout.splitlines() if line.strip()][-1]
    assert last == "sd2 run: report at " + str(out / "report" / "report.md"), second.stdout[-2000:]


def test_every_job_spec_merges_with_the_drivers_runtime_env(monkeypatch):
    """Ray refuses ray.init's runtime env when it sets a key the job's runtime env sets (even to
    the same value): inside each shipped spec's job, the driver adds only what the job lacks."""
    from sd2_ray import runtime

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    specs = sorted((REPO / "jobs" / "specs").glob("*.yaml"))
    specs.append(REPO / "clusters" / "kuberay-rayjob.yaml")
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        job_env = spec.get("runtime_env") or yaml.safe_load(spec["spec"]["runtimeEnvYAML"])
        monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
        for key, value in (job_env.get("env_vars") or {}).items():
            monkeypatch.setenv(key, value)  # what the job's driver process sees
        added = runtime.driver_runtime_env()
        # Ray's own merge, as ray.init runs it inside a submitted job (None = "Failed to merge")
        from ray._private.worker import _merge_runtime_env

        merged = _merge_runtime_env(job_env, added, override=False)
        assert merged is not None, f"{path.name}: Ray refuses to merge {added} into the job's {job_env}"
        assert merged["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"  # what the job lacks still goes


@pytest.fixture
def cluster_env(kit_dir, tmp_path) -> dict:
    """What the test's `ray start --head` cluster runs its jobs with: the cached kit, a small
    budget (the dense drafter only: the job's way onto the cluster is what this tests; the whole
    tiny job on a cluster is the autoscaling test's), a runs folder, and this virtualenv's
    `python` first on the PATH."""
    return {
        "SD2_KIT_DIR": kit_dir,
        "SD2_OVERRIDES": SMALL + " drafters=[dense] serve_smoke=false",
        "SD2_RUNS_DIR": str(tmp_path / "runs"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


@pytest.fixture
def cluster_cpus() -> int:
    """What `ray start --head` advertises on this machine (its cores)."""
    return os.cpu_count() or 2


def test_tiny_job_spec_runs_on_a_real_cluster(job_server, cluster_env):
    """`python jobs/submit.py jobs/specs/tiny.yaml` as the README says, against `ray start --head`:
    the job's driver joins the cluster (no runtime-env clash) and the run writes its report."""
    runs = Path(cluster_env["SD2_RUNS_DIR"])
    spec = yaml.safe_load((REPO / "jobs" / "specs" / "tiny.yaml").read_text())
    assert "SD2_RUNS_DIR" in spec["entrypoint"]
    result = subprocess.run(
        [sys.executable, "jobs/submit.py", "jobs/specs/tiny.yaml", "--address", job_server, "--poll-s", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "SUCCEEDED after 1 attempt(s)" in result.stdout
    report = json.loads((runs / "tiny" / "report" / "report.json").read_text())
    assert [d["name"] for d in report["drafters"]] == ["dense"]
