import json

import pyarrow as pa
import pytest

from sd2_ray import rows, storage
from sd2_ray.errors import DataError


def test_directory_reads_shards_not_metadata(tmp_path):
    out = tmp_path / "distilled"
    storage.write_parquet(str(out / "shard-00000.parquet"), pa.table({"id": ["a"], "prompt": ["p"]}))
    storage.write_json(str(out / "manifest.json"), {"status": "complete"})
    storage.write_json(str(out / "_shards" / "shard-00000.json"), {"rows": 1})
    (out / "config.yaml").write_text("x: 1\n")
    assert rows.data_files(str(out)) == [str(out / "shard-00000.parquet")]
    assert rows.read_rows(str(out)) == [{"id": "a", "prompt": "p"}]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n{broken\n")
    with pytest.raises(DataError, match=r"p.jsonl: line 3: invalid JSON"):
        rows.read_rows(str(path))


def test_ids_are_stable_and_problems_named():
    row = {"messages": [{"role": "user", "content": "hi"}]}
    assert rows.row_id(row) == rows.row_id(dict(row)) and rows.row_id({**row, "id": 7}) == "7"
    assert rows.row_problem({"prompt": 3}) == "'prompt' must be a non-empty string"
    assert "neither" in rows.row_problem({"response": "x"})
    assert rows.row_problem({"messages": [{"role": "user"}]}).startswith("'messages[0]'")
