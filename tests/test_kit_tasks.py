"""The kit's tasks (categories) without a build: each builder's rows, the splits kept apart, the
round-robin order, and the fine-tune's category filter (``distill.categories``)."""

from __future__ import annotations

import json

import pytest

from sd2_ray.errors import ConfigError
from sd2_ray.kit import prompts as P
from sd2_ray.kit import tasks
from sd2_ray.rows import row_problem

SOURCE = '''
def add(a, b):
    """Add two numbers and return the sum."""
    total = a + b
    return total


class Box:
    def get(self, key, default=None):
        """Return the value stored under key."""
        value = self.data.get(key, default)
        return value

    def put(self, key, value):
        """Store a value under key."""
        self.data[key] = value
        return self
'''


@pytest.fixture(scope="module")
def docs():
    return P.function_docs({"box.py": SOURCE})


def test_function_docs_keep_signature_summary_and_body(docs):
    by_name = {d.name: d for d in docs}
    assert set(by_name) == {"add", "get", "put"}
    get = by_name["get"]
    assert get.signature == "def get(self, key, default=None)"
    assert get.summary == "Return the value stored under key."
    assert get.body == "    value = self.data.get(key, default)\n    return value"
    assert get.with_docstring() == 'def get(self, key, default=None):\n    """Return the value stored under key."""\n'
    assert '"""' not in get.without_docstring() and "return value" in get.without_docstring()


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_gives_valid_rows_of_its_category(docs, name):
    examples = tasks.task_examples(name, docs, "train", seed=0)
    assert examples, name
    for i, example in enumerate(examples):
        row = P.make_row("train", i, example)
        assert row_problem(row) is None, row
        assert row["category"] == name and row["response"].strip()
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "user"
    assert len({e["key"] for e in examples}) == len(examples)


def test_the_answers_follow_from_the_prompts(docs):
    get = {d.name: d for d in docs}["get"]
    code = next(e for e in tasks.code(docs, "train", 0) if "def get" in e["key"])
    assert code["response"] == get.body + "\n"
    summary = next(e for e in tasks.summarization(docs, "train", 0) if "def get" in e["key"])
    assert summary["response"] == "Return the value stored under key."
    rag = next(e for e in tasks.rag(docs, "train", 0) if e["key"].endswith("What does put() do?"))
    assert rag["response"] == "put(): Store a value under key."
    assert "- get(self, key, default=None): Return the value" in rag["key"]
    chat = tasks.mt_bench(docs, "train", 0)[0]
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user"]


def test_pig_latin_is_the_textbook_rule():
    assert tasks.pig_latin("Return the string, apple.") == "Eturnray ethay ingstray, appleway."
    assert tasks.pig_latin_word("rhythm") == "ythmrhay"  # y after the first letter is a vowel


def test_math_steps_are_right_and_the_splits_share_no_expression():
    train = tasks.math_reasoning([], "train", 0)
    held = tasks.math_reasoning([], "heldout", 0)
    assert len(held) >= 100 and len(train) > 5 * len(held)
    assert not {e["key"] for e in train} & {e["key"] for e in held}
    for example in train[:50]:
        expression = example["key"].removeprefix("Compute ").removesuffix(" step by step.")
        assert example["response"].endswith(f"The answer is {eval(expression)}.")  # noqa: S307 (our own digits)
        for step in example["response"].splitlines()[:-1]:
            left, right = step.split(" = ")
            assert eval(left) == int(right)  # noqa: S307
    assert tasks.math_reasoning([], "train", 1) != train  # the seed picks other problems


def test_interleave_makes_every_prefix_balanced():
    groups = [[{"t": "a", "i": i} for i in range(3)], [{"t": "b", "i": i} for i in range(1)], [{"t": "c", "i": 0}]]
    order = [(r["t"], r["i"]) for r in P.interleave(groups)]
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("a", 2)]


def _distill_config(tmp_path, rows, **fields):
    from sd2_ray.distill.config import DistillConfig

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DistillConfig(prompts=str(path), target=str(tmp_path), output=str(tmp_path / "out"), **fields)


def test_distill_categories_filter_before_the_limit(tmp_path):
    from sd2_ray.distill.job import read_input

    rows = [{"id": str(i), "prompt": f"p{i}", "category": "code" if i % 3 else "math"} for i in range(9)]
    rows.append({"id": "x", "prompt": "no category"})
    config = _distill_config(tmp_path, rows, categories=["math"], limit=2)
    assert [r["id"] for r in read_input(config, [])] == ["0", "3"]
    everything = _distill_config(tmp_path, rows, limit=2)
    assert [r["id"] for r in read_input(everything, [])] == ["0", "1"]


def test_a_category_no_row_has_is_named(tmp_path):
    from sd2_ray.distill.job import read_input

    config = _distill_config(tmp_path, [{"prompt": "a", "category": "code"}], categories=["code", "maths"])
    with pytest.raises(ConfigError, match=r"field 'categories': .*\['maths'\] \(its categories: code\)"):
        read_input(config, [])


def test_mal_interval_is_the_ratio_estimators():
    """Per-request (committed, passes) as the sample: the interval holds the pooled MAL, widens with
    spread between requests, and is absent for fewer than two requests."""
    from sd2_ray.evaluate.figures import mal_interval
    from sd2_ray.specdec.types import SpecStats

    def req(committed, passes):
        return SpecStats(
            num_speculative_tokens=3, accepted_per_position=[0] * 3, committed_tokens=committed, target_passes=passes
        )

    same = mal_interval([req(20, 10), req(40, 20), req(10, 5)])
    assert same == pytest.approx([2.0, 2.0])  # every request at MAL 2: no spread
    low, high = mal_interval([req(10, 10), req(30, 10), req(25, 10), req(15, 10)])
    assert low < 2.0 < high and high - low == pytest.approx(2 * 1.96 * (((1 + 1 + 0.25 + 0.25) / 3 / 4) ** 0.5))
    assert mal_interval([req(10, 5)]) is None and mal_interval([req(10, 5), req(0, 0)]) is None
