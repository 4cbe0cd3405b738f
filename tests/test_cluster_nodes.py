"""Multi-node behaviour on this machine with Ray's own tool, ``ray.cluster_utils.Cluster``: a head
that takes no work, worker nodes that carry the cluster file's node-type markers, and a node
lost on cue (its raylet and workers SIGKILLed, as a reclaimed spot instance would be).

- placement: each stage's tasks/actors land on the node type its ``node_resources`` names;
- a local output path on a cluster of several nodes is refused in one line;
- distill: a generation node lost mid-run, every prompt id in the output exactly once;
- eval: a drafter's eval task lost with its node is retried elsewhere, same report;
- fine-tune: a training node lost mid-run, the group restarts from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from sd2_ray import storage

pytestmark = [pytest.mark.ray, pytest.mark.cluster]
GEN = {"gen_node": 0.001}


@pytest.fixture
def cluster(monkeypatch):
    """Head with no CPU (it schedules nothing), nodes added by the test; ``ensure_ray`` joins it."""
    import ray
    from ray.cluster_utils import Cluster

    from sd2_ray.testing.fake_cluster import free_ports

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # the dashboard serves Ray's state API, which the tests read placement from
    # task events every 200 ms (Ray's default: 1 s): a test that kills a running task's node sees it
    # RUNNING while it still runs
    made = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 80 * 2**20,
            "include_dashboard": True,
            "dashboard_port": free_ports(1)[0],
            "_system_config": {"task_events_report_interval_ms": 200},
        },
    )
    monkeypatch.setenv("RAY_ADDRESS", made.address)
    yield made
    ray.shutdown()
    made.shutdown()


def add_gen_node(cluster, cpus: int = 1):
    return cluster.add_node(num_cpus=cpus, resources={"gen_node": 1}, object_store_memory=80 * 2**20)


def state_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address  # not "auto": other Ray sessions may run here


def node_of_actor(title: str) -> set[str]:
    """Node ids of the live actors whose class name contains ``title`` (Ray's state API)."""
    from ray.util.state import list_actors

    return {
        a.node_id
        for a in list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], limit=1000)
        if title in (a.class_name or "")
    }


def write_jsonl(path, rows) -> str:
    storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_output_on_a_cluster_of_several_nodes_is_refused(cluster, tmp_path):
    """A local path would land on whichever node wrote it: one line naming the field; s3:// and a
    declared shared disk pass."""
    import ray

    from sd2_ray.errors import ConfigError
    from sd2_ray.runtime import ensure_ray, require_reachable

    add_gen_node(cluster)
    ensure_ray()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    with pytest.raises(ConfigError) as err:
        require_reachable(str(tmp_path / "out"))
    assert "field 'output'" in str(err.value) and "s3://" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    require_reachable("s3://bucket/run")
    require_reachable(str(tmp_path / "out"), shared=True)


def test_distill_loses_a_generation_node_and_writes_every_id_once(s3_bucket, cluster, kit_dir, tmp_path):
    """Three generation nodes, an engine actor on two of them, output on S3; a node holding an
    actor is SIGKILLed after the first shard is recorded (nodes cannot be added from the killer's
    thread: Ray's node start-up needs the main thread, so the third stands in for the
    autoscaler's replacement). The run finishes without a rerun, every prompt id exactly once,
    and every engine actor ran on a generation node."""
    import ray

    from sd2_ray.distill import core
    from sd2_ray.distill.config import DistillConfig
    from sd2_ray.distill.job import main
    from sd2_ray.kit import kit_paths
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    nodes = [add_gen_node(cluster) for _ in range(3)]
    ensure_ray()
    gen_ids = {n.node_id for n in nodes}
    rows = read_rows(kit_paths(kit_dir)["train_prompts"])[:32]
    out = f"s3://{s3_bucket}/distilled"
    config = DistillConfig(
        target=os.path.join(kit_dir, "target"),
        prompts=write_jsonl(tmp_path / "p.jsonl", rows),
        output=out,
        actors=2,
        batch_size=2,
        shard_size=4,
        max_new_tokens=32,
        node_resources=GEN,
        max_restarts=4,
    )
    records = storage.join(out, core.RECORDS_DIR)
    seen: dict = {"actor_nodes": set()}
    finished = threading.Event()

    def lose_a_node() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not finished.is_set():
            on = node_of_actor("TransformersBatchUDF")
            seen["actor_nodes"] |= on
            done = storage.list_files(records) if storage.is_dir(records) else []
            if "lost" not in seen and len(on) >= 2 and done:
                seen["shards_before"] = len(done)
                victim = next(n for n in nodes if n.node_id in on)
                cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet and workers
                seen["lost"] = victim.node_id
            time.sleep(0.2)

    killer = threading.Thread(target=lose_a_node, daemon=True)
    began = time.monotonic()
    killer.start()
    try:
        final = main(config)
    finally:
        finished.set()
        killer.join(timeout=10)
    assert "lost" in seen, "no node was lost"
    assert seen["shards_before"] < 8, "the loss came after the last shard: nothing was interrupted"
    assert final["status"] == "complete" and final["totals"]["rows_out"] == len(rows)
    ids = [r["id"] for r in core.read_distilled(out, include_failed=True)]
    assert ids == [r["id"] for r in rows]  # every id once, in input order
    assert seen["actor_nodes"] and seen["actor_nodes"] <= gen_ids  # engines only on generation nodes
    print(
        f"distill with a lost node: {time.monotonic() - began:.1f} s, "
        f"{seen['shards_before']} of 8 shards recorded before the loss"
    )
    assert ray.is_initialized()


def test_eval_task_lost_with_its_node_is_retried_with_the_same_report(cluster, kit_dir, tmp_path):
    """The pipeline's eval fan-out on generation nodes: the node running a drafter's eval task is
    SIGKILLed mid-task; Ray retries the task on the other generation node and the report equals
    the one measured without a failure."""
    from sd2_ray.evaluate.config import EvalConfig
    from sd2_ray.evaluate.fanout import evaluate_drafters
    from sd2_ray.kit import kit_paths
    from sd2_ray.runtime import ensure_ray

    nodes = [add_gen_node(cluster), add_gen_node(cluster)]
    ensure_ray()
    paths = kit_paths(kit_dir)

    def configs(root: str) -> dict[str, EvalConfig]:
        return {
            "dense": EvalConfig(
                target=paths["target"],
                drafter=paths["drafter"],
                prompts=paths["eval_prompts"],
                output=f"{root}/dense/report.json",
                num_speculative_tokens=4,
                max_prompts=24,
                max_new_tokens=64,
                batch_size=4,
                node_resources=GEN,
                measure_baseline=False,
            )
        }

    clean = evaluate_drafters(configs(str(tmp_path / "clean")), str(tmp_path / "clean"))["dense"]
    clean_tasks = {t.task_id for t in drafter_tasks()}
    lost: dict = {}
    finished = threading.Event()

    def lose_the_eval_node() -> None:
        from ray.util.state import list_tasks

        deadline = time.time() + 300
        while time.time() < deadline and not finished.is_set() and "node" not in lost:
            # the state API may still list the clean run's task as running: only this run's counts
            running = [
                t
                for t in list_tasks(address=state_address(), filters=[("state", "=", "RUNNING")], limit=1000)
                if t.name.endswith("_drafter_task") and t.task_id not in clean_tasks
            ]
            if running:
                victim = next(n for n in nodes if n.node_id == running[0].node_id)
                cluster.remove_node(victim, allow_graceful=False)
                lost["node"] = victim.node_id
                lost["at"] = time.monotonic()
            time.sleep(0.2)

    killer = threading.Thread(target=lose_the_eval_node, daemon=True)
    killer.start()
    try:
        report = evaluate_drafters(configs(str(tmp_path / "lost")), str(tmp_path / "lost"))["dense"]
        ended = time.monotonic()
    finally:
        finished.set()
        killer.join(timeout=10)
    assert "node" in lost, "no node was lost"
    attempts = drafter_task_attempts(since_loss_s=15, before=clean_tasks)
    # attempt 0 on the lost node must not have finished there: else the kill came too late to test anything
    assert (0, lost["node"], "FINISHED") not in attempts, f"the eval finished before its node was lost: {attempts}"
    assert any(number >= 1 and state == "FINISHED" for number, _, state in attempts), attempts  # retried elsewhere
    print(f"eval: the lost task's retry finished {ended - lost['at']:.1f} s after the node loss")
    for key in ("mean_accepted_length", "per_position_acceptance", "drafter_macs_per_token", "num_prompts"):
        assert report[key] == clean[key], key


@pytest.mark.slow  # 2.5 min; the default suite's autoscaling run loses its training node mid-fine-tune
def test_finetune_loses_a_training_node_and_resumes_from_its_checkpoint(cluster, s3_bucket, tmp_path):
    """A 2-worker ZeRO-2 fine-tune on training nodes, inputs, checkpoints and output on S3; once a
    checkpoint is registered, the node of one worker is SIGKILLed. Ray Train restarts the group on
    the nodes left (the spare one replacing the lost), training goes on from that checkpoint:
    every step exactly once, every masked weight still zero."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune
    from sd2_ray.models.io import load_model
    from sd2_ray.models.sparsity import load_masks, masked_weights_nonzero
    from sd2_ray.runtime import ensure_ray
    from sd2_ray.testing.toy import make_sparse_drafter, write_toy_dataset

    nodes = [
        cluster.add_node(num_cpus=1, resources={"train_node": 1}, object_store_memory=80 * 2**20) for _ in range(3)
    ]
    ensure_ray()
    root = f"s3://{s3_bucket}/ft"
    storage.copy_dir(make_sparse_drafter(str(tmp_path / "pruned"), 0.5), f"{root}/pruned")
    steps = 24
    cfg = FinetuneConfig(
        model=f"{root}/pruned",
        data=write_toy_dataset(f"{root}/data", 64),
        output=f"{root}/drafter",
        workers=2,
        zero_stage=2,
        max_steps=steps,
        epochs=3,
        checkpoint_every=4,
        lr=3e-3,
        batch_size=8,
        seq_len=64,
        warmup_steps=1,
        node_resources={"train_node": 0.001},
    )
    snapshot = storage.join(cfg.checkpoint_run_dir(), "checkpoint_manager_snapshot.json")
    began = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_finetune, cfg)
        deadline, lost = time.monotonic() + 300, {}
        while time.monotonic() < deadline and not future.done() and not lost:
            registered = re.findall(r"step-(\d{7})", storage.read_text(snapshot)) if storage.exists(snapshot) else []
            workers = node_of_actor("RayTrainWorker")
            if registered and len(workers) == 2:
                victim = next(n for n in nodes if n.node_id in workers)
                cluster.remove_node(victim, allow_graceful=False)
                lost = {"node": victim.node_id, "step": max(int(s) for s in registered), "at": time.monotonic()}
            time.sleep(0.2)
        result = future.result()
    assert lost, "no training node was lost"
    history = [(h["step"], h["restarts"]) for h in result.history]
    assert [step for step, _ in history] == list(range(1, steps + 1))  # every step once, in order
    resumed = [step for step, restarts in history if restarts >= 1]
    assert resumed and resumed[0] - 1 >= lost["step"] and (resumed[0] - 1) % 4 == 0  # from a checkpoint
    assert lost["node"] not in node_of_actor("RayTrainWorker")  # (none alive now, or elsewhere)
    out = storage.local_dir(result.output)
    assert masked_weights_nonzero(load_model(out), load_masks(out)) == 0
    print(
        f"finetune with a lost node: {time.monotonic() - began:.0f} s in all; newest checkpoint at the loss: "
        f"step {lost['step']}; resumed at step {resumed[0]}; {time.monotonic() - lost['at']:.0f} s from the loss "
        f"to the end"
    )


def drafter_tasks() -> list:
    from ray.util.state import list_tasks

    return list_tasks(address=state_address(), filters=[("name", "=", "_drafter_task")], limit=100)


def drafter_task_attempts(since_loss_s: float, before: set[str]) -> set[tuple[int, str, str]]:
    """(attempt, node, state) of the eval tasks not in ``before`` (task ids); task events arrive
    late, so wait up to ``since_loss_s`` for a finished retry to show."""
    deadline = time.monotonic() + since_loss_s
    while True:
        seen = {(t.attempt_number, t.node_id, t.state) for t in drafter_tasks() if t.task_id not in before}
        if any(n >= 1 and state == "FINISHED" for n, _, state in seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


REPO_CLUSTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clusters", "aws-gpu.yaml")


def test_fake_cluster_config_mirrors_the_shipped_cluster_file():
    """Same worker node-type names, bounds, GPUs and custom resources; CPUs scaled down; the
    head (Ray's fake provider calls it ray.head.default) still takes no work."""
    import yaml

    from sd2_ray.testing.fake_cluster import FAKE_HEAD_TYPE, fake_cluster_config

    shipped = yaml.safe_load(open(REPO_CLUSTER))
    fake = fake_cluster_config(REPO_CLUSTER, gcs_port=6390, cpus_per_node=2)
    workers = {k: v for k, v in shipped["available_node_types"].items() if k != shipped["head_node_type"]}
    assert set(fake["available_node_types"]) == set(workers) | {FAKE_HEAD_TYPE}
    for name, spec in workers.items():
        made = fake["available_node_types"][name]
        assert (made["min_workers"], made["max_workers"]) == (spec.get("min_workers", 0), spec["max_workers"])
        for key, value in spec["resources"].items():
            assert made["resources"][key] == (min(value, 2) if key == "CPU" else value), (name, key)
    assert fake["head_cpus"] == shipped["available_node_types"][shipped["head_node_type"]]["resources"]["CPU"] == 0
    assert fake["provider"]["gcs_address"] == "127.0.0.1:6390"


def test_each_stage_asks_for_its_node_type_from_the_cluster_file(tmp_path):
    """distill/eval/serve on generation nodes, prune/layer baseline/fine-tune (and a search's
    trials) on training nodes; a section that sets node_resources keeps it; no cluster file,
    no constraint."""
    from sd2_ray.config import validate
    from sd2_ray.pipeline.chain import (
        distill_config,
        eval_config,
        finetune_config,
        layer_prune_config,
        prune_config,
        serve_config,
        tune_config,
    )
    from sd2_ray.pipeline.config import PipelineConfig

    base = {
        "output": str(tmp_path),
        "target": str(tmp_path),
        "drafter": str(tmp_path),
        "train_prompts": str(tmp_path),
        "eval_prompts": str(tmp_path),
        "tune": {"search_space": {"sparsity": [0.5], "lr": [1e-3]}},
    }
    config = validate(
        PipelineConfig, {**base, "cluster": REPO_CLUSTER, "serve": {"node_resources": {"serve_node": 1}}}, source="t"
    )
    placed = config.with_cluster_placement()
    train = {"train_node": 0.001}
    assert distill_config(placed).node_resources == GEN and eval_config(placed).node_resources == GEN
    assert prune_config(placed).node_resources == train and finetune_config(placed).node_resources == train
    assert layer_prune_config(placed, drop_layers=1).node_resources == train
    assert serve_config(placed).node_resources == {"serve_node": 1}
    tune = tune_config(placed)
    assert tune.node_resources == GEN and tune.prune.node_resources == train and tune.finetune.node_resources == train
    plain = validate(PipelineConfig, base, source="t").with_cluster_placement()
    assert distill_config(plain).node_resources == {} and finetune_config(plain).node_resources == {}


def test_plan_places_each_stage_on_the_node_type_it_asks_for():
    """`sd2 plan` checks the stages where `sd2 run` places them: the fine-tune on the training
    nodes (before, on the first type with room: the generation nodes)."""
    from sd2_ray.plan.job import check, load_planned

    config = os.path.join(os.path.dirname(REPO_CLUSTER), "..", "jobs", "configs", "llama70b_to_llama3b.yaml")
    where = {p.need.stage: p.node.name for p in check(load_planned(config))}
    assert {where[s] for s in ("distill", "eval", "serve")} == {"gpu_generate"}
    assert {where[s] for s in ("prune", "layer_prune", "finetune", "tune.finetune")} == {"gpu_train"}


@pytest.mark.slow  # 2.5-3.5 min; the default suite loses nodes in distill, eval and fine-tune above
def test_tune_trial_lost_with_its_node_is_retried_and_resumes_from_its_checkpoint(
    cluster, kit_dir, tmp_path, monkeypatch
):
    """Two identical trials (num_samples 2, one at a time) on two nodes; once the first has a
    fine-tuning checkpoint, the node running its trial function is SIGKILLed. Tune runs the trial
    again (trial_max_failures), its fine-tune goes on from that checkpoint, and its measured MAL
    equals the second trial's, which lost nothing."""
    import glob
    import re
    from concurrent.futures import ThreadPoolExecutor

    from sd2_ray.kit import kit_paths
    from sd2_ray.runtime import SHARED_STORAGE_ENV, ensure_ray
    from sd2_ray.tune import report as R
    from sd2_ray.tune.config import TuneConfig
    from sd2_ray.tune.job import main

    monkeypatch.setenv(SHARED_STORAGE_ENV, "1")  # one machine's disk, declared shared on purpose
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=80 * 2**20) for _ in range(2)]
    ensure_ray()  # here: joining Ray from the search's thread fails after another test's Ray
    parts, out = kit_paths(kit_dir), str(tmp_path / "search")
    config = TuneConfig.model_validate(
        dict(
            output=out,
            target=parts["target"],
            drafter=parts["drafter"],
            data=parts["train_prompts"],
            eval_prompts=parts["eval_prompts"],
            search_space={"sparsity": [0.5], "lr": [3e-3]},
            num_samples=2,
            max_concurrent=1,
            asha={"enabled": False},
            max_steps=8,
            max_eval_prompts=4,
            eval_max_new_tokens=16,
            prune={"method": "magnitude", "num_cpus": 0.5},
            finetune={"workers": 1, "batch_size": 4, "seq_len": 96, "checkpoint_every": 2, "warmup_steps": 1},
            stall_timeout_s=300,
        )
    )
    began, lost = time.monotonic(), {}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(main, config)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not future.done() and not lost:
            snapshots = glob.glob(f"{out}/trials/*/checkpoints/drafter/checkpoint_manager_snapshot.json")
            steps = re.findall(r"step-(\d{7})", open(snapshots[0]).read()) if snapshots else []
            trial_nodes = node_of_actor("ImplicitFunc")
            if steps and len(trial_nodes) == 1:
                victim = next(n for n in nodes if n.node_id in trial_nodes)
                cluster.remove_node(victim, allow_graceful=False)
                lost = {
                    "step": max(int(s) for s in steps),
                    "at": time.monotonic(),
                    "trial": snapshots[0].split("/")[-4],
                }
            time.sleep(0.2)
        future.result()
    assert lost, "no trial node was lost"
    trials = {t["trial_id"]: t for t in json.load(open(os.path.join(out, R.TRIALS_FILE)))}
    hit = trials[lost["trial"]]
    other = next(t for t in trials.values() if t is not hit)
    assert hit["status"] == other["status"] == R.COMPLETED, trials
    attempts = json.load(open(os.path.join(out, "trials", lost["trial"], "attempts.json")))
    assert len(attempts) == 2  # the trial function ran again, once
    assert hit["steps"] == other["steps"] == 8
    assert hit["mal"] == other["mal"] and hit["mal"] is not None, (hit["mal"], other["mal"])
    print(
        f"tune: trial node lost with the step-{lost['step']} checkpoint; the search ended "
        f"{time.monotonic() - lost['at']:.0f} s after the loss, {time.monotonic() - began:.0f} s in all"
    )


@pytest.mark.slow  # 2-3 min; a feature actor's node lost mid-stream while a head trains
def test_feature_head_training_loses_its_feature_node_and_every_step_runs_once(cluster, s3_bucket, kit_dir):
    """A feature head's fine-tune on a cluster: its training worker on a training node, the target's
    feature actor on a generation node, target, rows and output on S3 (no shared disk). Once the
    head trains, the feature actor's node is SIGKILLed: Ray Data restarts the actor on the spare
    generation node and retries its batches; training goes on, every step exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    from sd2_ray.feature.head import is_feature_head
    from sd2_ray.finetune.config import FinetuneConfig
    from sd2_ray.finetune.job import run_finetune
    from sd2_ray.kit import kit_paths
    from sd2_ray.rows import read_rows
    from sd2_ray.runtime import ensure_ray

    cluster.add_node(num_cpus=2, resources={"train_node": 1}, object_store_memory=80 * 2**20)
    gen = [add_gen_node(cluster) for _ in range(2)]
    ensure_ray()
    root = f"s3://{s3_bucket}/heads"
    storage.copy_dir(os.path.join(kit_dir, "target"), f"{root}/target")
    rows = read_rows(kit_paths(kit_dir)["train_prompts"])[:160]
    storage.write_text(f"{root}/rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    steps = 40  # two epochs: the stream runs twice
    cfg = FinetuneConfig(
        model=f"{root}/target",
        data=f"{root}/rows.jsonl",
        output=f"{root}/eagle",
        workers=1,
        epochs=2,
        batch_size=8,
        seq_len=96,
        lr=1e-3,
        checkpoint_every=10,
        node_resources={"train_node": 0.001},
        feature_head={"variant": "eagle", "stream": {"batch_size": 4, "node_resources": GEN}},
    )
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_finetune, cfg)
        deadline, lost = time.monotonic() + 300, {}
        while time.monotonic() < deadline and not future.done() and not lost:
            actors, workers = node_of_actor("FeatureExtractor"), node_of_actor("RayTrainWorker")
            if workers and actors and storage.exists(f"{root}/eagle/_checkpoints/eagle/step-0000010"):
                victim = next(n for n in gen if n.node_id in actors)
                cluster.remove_node(victim, allow_graceful=False)
                lost = {"node": victim.node_id}
            time.sleep(0.2)
        result = future.result()
    assert lost, "no feature node was lost"
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))  # every step once, in order
    assert is_feature_head(storage.local_dir(result.output))
    assert lost["node"] not in node_of_actor("FeatureExtractor")
