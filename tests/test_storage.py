import os

import pyarrow as pa
import pytest

from sd2_ray import manifest, storage


def roots(tmp_path, bucket):
    return [str(tmp_path / "local"), f"s3://{bucket}/run"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "local")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/run"


def test_file_roundtrip(root):
    path = storage.join(root, "a", "b.json")
    assert not storage.exists(path)
    storage.write_json(path, {"x": 1})
    assert storage.read_json(path) == {"x": 1}
    assert storage.list_files(storage.join(root, "a")) == [path]
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(path)


def test_parquet_roundtrip(root):
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    storage.write_parquet(storage.join(root, "shards", "part-0.parquet"), table)
    storage.write_parquet(storage.join(root, "shards", "part-1.parquet"), table)
    got = storage.read_parquet(storage.join(root, "shards"))
    assert got.num_rows == 4 and sorted(got.column("id").to_pylist()) == ["a", "a", "b", "b"]


def test_manifest_status(root):
    out = storage.join(root, "stage")
    assert not manifest.is_complete(out)
    first = manifest.start(out, "distill", rows=0)
    assert not manifest.is_complete(out)
    done = manifest.complete(out, "distill", rows=10)
    assert manifest.is_complete(out)
    assert done["created_at"] == first["created_at"] and done["rows"] == 10


def test_torn_manifest_is_unfinished(tmp_path):
    out = str(tmp_path / "stage")
    os.makedirs(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write('{"status": "compl')
    assert not manifest.is_complete(out)


def test_failed_local_write_leaves_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "f.txt")
    storage.write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_text(path, "new")
    monkeypatch.undo()
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


def test_dir_to_s3_and_back(tmp_path, s3_bucket, monkeypatch):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 100)
    remote = f"s3://{s3_bucket}/models/m"
    storage.copy_dir(str(src), remote)
    monkeypatch.setenv("SD2_CACHE_DIR", str(tmp_path / "cache"))
    local = storage.local_dir(remote)
    assert open(os.path.join(local, "config.json")).read() == "{}"
    assert os.path.getsize(os.path.join(local, "sub", "w.bin")) == 100
    assert storage.local_dir(remote) == local  # cached
    storage.write_text(remote + "/config.json", '{"changed": 1}')
    again = storage.local_dir(remote)
    assert open(os.path.join(again, "config.json")).read() == '{"changed": 1}'


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.read_text(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nodir"):
        storage.local_dir(str(tmp_path / "nodir"))
