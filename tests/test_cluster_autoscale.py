"""The tiny job spec on an autoscaling cluster built from the shipped ``clusters/aws-gpu.yaml``
(Ray's fake multi-node provider: the autoscaler starts raylets on this machine as nodes of the
file's node types): submitted with ``jobs/submit.py`` as the README says, outputs under
``s3://`` (a loopback S3 server; no stage may rely on one node's disk), the head taking no
work. Checks that the autoscaler adds the workers the stages ask for, that each stage ran on
the node type it is meant for (Ray's state API), that the report's MALs are what the drafters
measure, and that idle workers go away. Mid-run, once the fine-tune has a checkpoint, the raylet
of the training node is SIGKILLed (a reclaimed spot instance) and a new training node joins
(started by the test: Ray's fake provider cannot replace a node whose raylet died, see
``FakeCluster.join_node``); the fine-tune resumes from its checkpoint and `sd2 run` ends with its
report in the same job, with no manual step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# 4-5 min, the heaviest test there is: the one whole run on several nodes
pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[1]
SMALL = (
    "distill.limit=64 finetune.epochs=8 finetune.max_steps=48 finetune.checkpoint_every=16 "
    "eval.max_prompts=16 eval.max_new_tokens=32 drafters=[dense,sd2] serve_smoke=false"
)
# stage -> (what Ray's state API names its work, node type it must run on)
WHERE = {
    "distill": ("TransformersBatchUDF", "gpu_generate"),
    "prune": ("_ray_task", "gpu_train"),
    "finetune": ("RayTrainWorker", "gpu_train"),
    "eval": ("_drafter_task", "gpu_generate"),
}


def node_type(resources: dict) -> str:
    if resources.get("node:__internal_head__"):
        return "head"
    for marker, name in (("gen_node", "gpu_generate"), ("train_node", "gpu_train")):
        if marker in resources:
            return name
    return "cpu_worker"


class NodeWatch(threading.Thread):
    """Every node seen while the job runs ({id: type}) and the live count over time: nodes that
    the autoscaler removes later are still named."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.types, self.timeline, self.done = address, {}, [], threading.Event()
        self.first_seen: dict[str, float] = {}  # node id -> time.monotonic() when first seen

    def run(self) -> None:
        import ray

        began = time.monotonic()
        while not self.done.is_set():
            alive = [n for n in ray.nodes() if n["Alive"]]
            for n in alive:
                self.types.setdefault(n["NodeID"], node_type(n["Resources"]))
                self.first_seen.setdefault(n["NodeID"], time.monotonic())
            self.timeline.append((round(time.monotonic() - began, 1), sorted(self.types[n["NodeID"]] for n in alive)))
            self.done.wait(1.0)


class LoseTrainingNode(threading.Thread):
    """Once the fine-tune has registered a checkpoint (on S3), SIGKILL the raylet of the node its
    training worker runs on, and that node's Ray workers: the node is gone without a goodbye."""

    def __init__(self, fake, s3, bucket: str):
        super().__init__(daemon=True)
        self.fake, self.dashboard, self.s3, self.bucket = fake, fake.dashboard, s3, bucket
        self.lost: dict = {}
        self.done = threading.Event()

    def checkpointed(self) -> bool:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="runs/tiny/drafters/")
        for item in listed.get("Contents", []):
            if item["Key"].endswith("checkpoint_manager_snapshot.json"):
                body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                if b"step-" in body:
                    return True
        return False

    def run(self) -> None:
        from _ray_procs import kill_node_of
        from ray.util.state import list_actors

        while not self.done.is_set() and not self.lost:
            workers = list_actors(
                address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
            )
            trainer = [a for a in workers if "RayTrainWorker" in (a.class_name or "") and a.pid]
            if trainer and self.checkpointed():
                try:
                    kill_node_of(trainer[0].pid)
                except (OSError, StopIteration):  # the worker just ended: look again
                    continue
                self.lost = {"node": trainer[0].node_id, "at": time.monotonic()}
                self.fake.join_node("gpu_train")  # the replacement instance
            self.done.wait(1.0)


def scaled_workers(watch: NodeWatch, lost_at: float | None) -> set[str]:
    """Live generation/training nodes the autoscaler started (not a replacement joined by hand
    after the loss at ``lost_at``)."""
    import ray

    return {
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"]
        and watch.types.get(n["NodeID"]) in ("gpu_generate", "gpu_train")
        and not (lost_at is not None and watch.first_seen.get(n["NodeID"], 0.0) > lost_at)
    }


def last_job_logs(dashboard: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    return client.get_job_logs(jobs[-1].submission_id)[-3000:] if jobs else ""


def stage_nodes(dashboard: str) -> dict[str, set[str]]:
    """{stage: node ids its work ran on}, from the tasks and actors Ray's state API recorded."""
    from ray.util.state import list_actors, list_tasks

    found: dict[str, set[str]] = {stage: set() for stage in WHERE}
    tasks = list_tasks(address=dashboard, limit=10000, raise_on_missing_output=False)
    actors = list_actors(address=dashboard, limit=10000, raise_on_missing_output=False)
    for stage, (name, _) in WHERE.items():
        found[stage] |= {t.node_id for t in tasks if t.name.endswith(name) and t.node_id}
        found[stage] |= {a.node_id for a in actors if name in (a.class_name or "") and a.node_id}
    return found


def spec_without_working_dir(tmp_path) -> str:
    """The shipped tiny spec, but running the checkout in place instead of uploading it: every
    fake node shares one machine's session directory, where Ray's runtime-env agents of several
    nodes unpack and garbage-collect the same working_dir package and race (seen: a job whose
    driver found half a package). On a real cluster each node has its own disk."""
    import yaml

    spec = yaml.safe_load((REPO / "jobs" / "specs" / "tiny.yaml").read_text())
    spec["runtime_env"].pop("working_dir")
    spec["runtime_env"].pop("excludes", None)
    spec["entrypoint"] = spec["entrypoint"].replace("jobs/", f"{REPO}/jobs/")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_tiny_job_spec_on_an_autoscaling_cluster_from_the_cluster_file(kit_dir, s3_bucket, s3_server, tmp_path):
    import boto3
    import ray
    from ray.job_submission import JobSubmissionClient

    from sd2_ray.testing.fake_cluster import FakeCluster

    runs = f"s3://{s3_bucket}/runs"
    env = {
        "SD2_KIT_DIR": kit_dir,
        "SD2_RUNS_DIR": runs,
        "SD2_OVERRIDES": SMALL + f" cluster={REPO}/clusters/aws-gpu.yaml",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
    }
    fake = FakeCluster.from_cluster_file(
        REPO / "clusters" / "aws-gpu.yaml",
        env=env,
        cpus_per_node=2,
        max_workers={"cpu_worker": 1, "gpu_generate": 1, "gpu_train": 1},
    )
    assert fake.config["head_cpus"] == 0  # the file's rule: the head schedules nothing
    with fake:
        ray.init(address=fake.address)
        watch = NodeWatch(fake.address)
        watch.start()
        killer = LoseTrainingNode(fake, boto3.client("s3", endpoint_url=s3_server), s3_bucket)
        killer.start()
        began = time.monotonic()
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "jobs/submit.py",
                    spec_without_working_dir(tmp_path),
                    "--address",
                    fake.dashboard,
                    "--poll-s",
                    "2",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=1500,
                env={**os.environ, "RAY_ADDRESS": fake.dashboard},
            )
            finished = time.monotonic()
            job_s = finished - began
            assert result.returncode == 0, (result.stdout + result.stderr)[-1000:] + last_job_logs(fake.dashboard)
            where = stage_nodes(fake.dashboard)
            submitted = [j for j in JobSubmissionClient(fake.dashboard).list_jobs() if j.submission_id]
            # idle workers the autoscaler started go away (idle_timeout 15 s); the file keeps one
            # cpu_worker (min_workers 1); the hand-started replacement is not the autoscaler's
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and scaled_workers(watch, killer.lost.get("at")):
                time.sleep(2)
            left = scaled_workers(watch, killer.lost.get("at"))
        finally:
            watch.done.set()
            killer.done.set()
            watch.join(timeout=5)
            killer.join(timeout=5)
            ray.shutdown()
    assert killer.lost, "no training node was lost"
    seen = {t for _, types in watch.timeline for t in types}
    assert {"gpu_generate", "gpu_train"} <= seen, watch.timeline[-5:]  # the autoscaler added them
    assert not left, (left, watch.timeline[-5:])  # and removed them
    for stage, (_, wanted) in WHERE.items():
        assert where[stage], f"{stage}: no work found in Ray's state API"
        assert {watch.types.get(n) for n in where[stage]} == {wanted}, (stage, where[stage], watch.types)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    report = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/tiny/report/report.json")["Body"].read())
    mals = {d["name"]: d["mean_accepted_length"] for d in report["drafters"]}
    assert set(mals) == {"dense", "sd2"} and mals["sd2"] > mals["dense"]
    for name in mals:  # the report holds what each drafter's own eval measured
        saved = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"runs/tiny/eval/{name}/report.json")["Body"].read())
        assert saved["mean_accepted_length"] == mals[name]
    trained = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/tiny/drafters/sd2/metrics.json")["Body"].read())
    assert trained["restarts"] >= 1  # resumed from a checkpoint after the loss, not retrained
    assert [h["step"] for h in trained["steps"]] == list(range(1, trained["total_steps"] + 1))
    assert len(submitted) == 1  # no resubmission: the run itself got past the loss
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/tiny/kit/")
    assert listed.get("KeyCount", 0) > 0  # the kit parts other nodes read were published there
    print(
        f"autoscaled tiny job: {job_s:.0f} s, MALs {mals}, training node lost {killer.lost['at'] - began:.0f} s in, "
        f"{finished - killer.lost['at']:.0f} s from the loss to the end, resumed after step "
        f"{next(h['step'] - 1 for h in trained['steps'] if h.get('restarts'))}; nodes over time {watch.timeline[::15]}"
    )
