"""Feature streaming on a real local Ray with the model kit's target: the actor pool's rows equal
the target's own pass, every row reaches exactly one of the split consumers once, also when a
feature actor is SIGKILLed mid-stream, nothing is written unless a cache is asked for, and the
cache is reused."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sd2_ray.feature.config import FeatureStreamSettings
from sd2_ray.feature.extract import ExtractSettings, extract_rows

pytestmark = pytest.mark.ray

EXTRACTOR_TITLE = "FeatureExtractor"


@pytest.fixture(scope="module")
def kit_rows(kit_dir):
    from sd2_ray.kit import kit_paths
    from sd2_ray.rows import read_rows

    return read_rows(kit_paths(kit_dir)["train_prompts"])


def rows_dataset(rows, tmp_path):
    import pyarrow as pa

    from sd2_ray import storage
    from sd2_ray.finetune.ray_train import build_dataset
    from sd2_ray.runtime import ensure_ray

    ensure_ray()
    path = str(tmp_path / "rows.parquet")
    storage.write_parquet(path, pa.Table.from_pylist(rows))
    return build_dataset([path])


def settings(**fields) -> dict:
    return ExtractSettings(layers=(-1,), seq_len=96, use_response_ids=False, **fields).as_dict()


def consume_split(ds, n: int) -> list[list[dict]]:
    """What n Ray Train workers would get: ``streaming_split`` shards iterated in threads."""
    shards = ds.streaming_split(n, equal=True)  # as Ray Train splits
    seen: list[list[dict]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for batch in shards[i].iter_batches(batch_size=4, batch_format="numpy"):
            seen[i].extend({k: batch[k][j] for k in batch} for j in range(len(batch["row_id"])))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return seen


def test_streamed_rows_equal_the_targets_pass_and_each_reaches_one_worker(kit_dir, kit_rows, tmp_path):
    from sd2_ray.feature.stream import feature_dataset
    from sd2_ray.models.io import load_model, load_tokenizer

    rows = kit_rows[:24]
    target_dir = os.path.join(kit_dir, "target")
    ds = feature_dataset(rows_dataset(rows, tmp_path), target_dir, FeatureStreamSettings(batch_size=4), settings())
    seen = consume_split(ds, 2)
    assert all(seen), "a worker got nothing"
    got = {str(r["row_id"]): r for part in seen for r in part}
    assert sum(len(p) for p in seen) == len(rows) == len(got)
    extract = ExtractSettings.from_dict(settings())
    direct = extract_rows(load_model(target_dir), load_tokenizer(target_dir), rows[:3], extract)
    for i in range(3):
        row = got[direct["row_id"][i]]
        np.testing.assert_array_equal(row["input_ids"], direct["input_ids"][i])
        np.testing.assert_array_equal(row["target_ids"], direct["target_ids"][i])
        np.testing.assert_allclose(row["features"], direct["features"][i], rtol=1e-4, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["rows.parquet"]  # nothing written


@pytest.mark.slow  # 1 min; as distill's actor-kill test
def test_a_killed_feature_actor_is_restarted_and_every_row_arrives_once(kit_dir, kit_rows, tmp_path):
    """SIGKILL a live feature actor once the stream has started: Ray Data restarts it and retries
    its batches; the split consumers still see every row exactly once."""
    from _ray_procs import our_raylet_pid, ray_worker_pids

    from sd2_ray.feature.stream import feature_dataset

    rows = kit_rows[:64]
    ds = rows_dataset(rows, tmp_path)
    stream = FeatureStreamSettings(actors=1, batch_size=2, max_restarts=2)
    features = feature_dataset(ds, os.path.join(kit_dir, "target"), stream, settings(torch_threads=1))
    raylet = our_raylet_pid()
    killed: dict = {"seen": set()}
    finished = threading.Event()
    consumed: list = []

    def kill_one_actor_mid_stream() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not finished.is_set():
            pids = ray_worker_pids(EXTRACTOR_TITLE, raylet)
            killed["seen"].update(pids)
            if "pid" not in killed and pids and sum(len(p) for p in consumed) >= 4:
                killed["rows_before"] = sum(len(p) for p in consumed)
                killed["before"] = set(killed["seen"])
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
            time.sleep(0.01)

    shards = features.streaming_split(2, equal=True)
    consumed.extend([[], []])

    def read(i: int) -> None:
        for batch in shards[i].iter_batches(batch_size=2, batch_format="numpy"):
            consumed[i].extend(str(r) for r in batch["row_id"])

    killer = threading.Thread(target=kill_one_actor_mid_stream, daemon=True)
    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    killer.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=300)
    finished.set()
    killer.join(timeout=5)
    assert "pid" in killed, "no feature actor was killed"
    assert killed["rows_before"] < len(rows), "the kill came after the stream ended"
    assert killed["seen"] - killed["before"], "no new feature actor process after the kill"
    ids = consumed[0] + consumed[1]
    assert sorted(ids) == sorted(str(r["id"]) for r in rows)  # every row, exactly once


@pytest.mark.slow  # 1 min of Ray Data start-up for a cache round trip
def test_the_opt_in_cache_is_written_once_and_reused(kit_dir, kit_rows, tmp_path):
    from sd2_ray.feature.stream import CACHE_DONE, feature_dataset

    rows = kit_rows[:8]
    cache = str(tmp_path / "cache")
    stream = FeatureStreamSettings(batch_size=4, cache=cache)
    target_dir = os.path.join(kit_dir, "target")
    first = feature_dataset(rows_dataset(rows, tmp_path), target_dir, stream, settings())
    assert os.path.exists(os.path.join(cache, CACHE_DONE))
    ids = sorted(str(r["row_id"]) for r in first.take_all())
    # the second read comes from the cache: a target dir that does not exist is never opened
    again = feature_dataset(rows_dataset(rows, tmp_path), str(tmp_path / "no-target"), stream, settings())
    assert sorted(str(r["row_id"]) for r in again.take_all()) == ids == sorted(str(r["id"]) for r in rows)
