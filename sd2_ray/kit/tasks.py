"""The kit's tasks, one per Spec-Bench-style category, each built deterministically from the
stdlib corpus or generated from the seed:

============== ===========================================================================
code           complete a function from its ``def`` line and docstring (the first kit task)
summarization  one-line summary of a function shown without its docstring
translation    a docstring sentence into Pig Latin (a deterministic rewrite learned in pretraining)
rag            answer a question about one function from a passage listing several
math_reasoning step-by-step integer arithmetic, generated from the seed
mt_bench       two user turns: complete a function, then summarise it
============== ===========================================================================

Every builder takes the functions of one split (train files or held-out files) and returns
examples ``{key, category, messages, response}``; ``key`` is what the seeded selection orders by.
The arithmetic task has no files: its split is a seeded hash of each expression.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

from sd2_ray.kit.prompts import FunctionDoc

CODE, SUMMARIZATION, TRANSLATION, RAG, MATH, CHAT = (
    "code",
    "summarization",
    "translation",
    "rag",
    "math_reasoning",
    "mt_bench",
)
PASSAGE_FUNCTIONS = 3  # functions listed in one RAG passage
MAX_SIGNATURE_CHARS = 60
MATH_CANDIDATES = 6000  # expressions drawn per seed; about 1 in 8 is held out
MATH_HELDOUT_SHARE = 8
WORD = re.compile(r"[A-Za-z]+")


def _user(*turns: str) -> list[dict[str, str]]:
    """Alternating user/assistant messages, starting and ending with a user turn."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def code(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    out = []
    for d in docs:
        prompt = "Complete this Python function:\n\n" + d.with_docstring()
        out.append({"key": prompt, "category": CODE, "messages": _user(prompt), "response": d.body + "\n"})
    return out


def summarization(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    out = []
    for d in docs:
        prompt = "Summarise this Python function in one line:\n\n" + d.without_docstring()
        out.append(
            {"key": prompt, "category": SUMMARIZATION, "messages": _user(prompt), "response": _one_line(d.summary)}
        )
    return out


def pig_latin_word(word: str) -> str:
    """``string`` -> ``ingstray``, ``apple`` -> ``appleway``; the capital stays in front."""
    lower = word.lower()
    if lower[0] in "aeiou":
        moved = lower + "way"
    else:
        first_vowel = next((i for i, ch in enumerate(lower) if ch in "aeiouy" and i > 0), len(lower))
        moved = lower[first_vowel:] + lower[:first_vowel] + "ay"
    return moved.capitalize() if word[0].isupper() else moved


def pig_latin(text: str) -> str:
    return WORD.sub(lambda m: pig_latin_word(m.group(0)), text)


def translation(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    out, seen = [], set()
    for d in docs:
        sentence = _one_line(d.summary)
        if sentence in seen or len(WORD.findall(sentence)) < 3:
            continue
        seen.add(sentence)
        prompt = "Translate into Pig Latin:\n\n" + sentence
        out.append({"key": prompt, "category": TRANSLATION, "messages": _user(prompt), "response": pig_latin(sentence)})
    return out


def _entry(d: FunctionDoc) -> str:
    signature = d.signature.removeprefix("async ").removeprefix("def ")
    signature = signature.split(" ->")[0]
    if len(signature) > MAX_SIGNATURE_CHARS:
        signature = signature[: MAX_SIGNATURE_CHARS - 4] + "...)"
    return f"- {signature}: {_one_line(d.summary)}"


def rag(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    """Passages of up to three functions of one file; one question per function listed."""
    by_file: dict[str, list[FunctionDoc]] = {}
    for d in docs:
        by_file.setdefault(d.source, []).append(d)
    out = []
    for source in sorted(by_file):
        group = by_file[source]
        for start in range(0, len(group) - 1, PASSAGE_FUNCTIONS):
            chunk = group[start : start + PASSAGE_FUNCTIONS]
            if len(chunk) < 2:
                continue
            passage = "\n".join(_entry(d) for d in chunk)
            for d in chunk:
                prompt = f"Answer from the passage.\n\nPassage:\n{passage}\n\nQuestion: What does {d.name}() do?"
                answer = f"{d.name}(): {_one_line(d.summary)}"
                out.append({"key": prompt, "category": RAG, "messages": _user(prompt), "response": answer})
    return out


def _expression(rng: random.Random) -> tuple[str, list[str], int]:
    """(expression, the worked steps, the value) of one arithmetic problem."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    form = rng.randrange(3)
    if form == 0:
        return f"({a} + {b}) * {c}", [f"{a} + {b} = {a + b}", f"{a + b} * {c} = {(a + b) * c}"], (a + b) * c
    if form == 1:
        return f"{a} * {c} - {b}", [f"{a} * {c} = {a * c}", f"{a * c} - {b} = {a * c - b}"], a * c - b
    return f"{a} + {b} + {c}", [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"], a + b + c


def math_reasoning(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    """Arithmetic with its steps; an expression is held out when its seeded hash says so, so the
    splits never share one."""
    out, seen = [], set()
    for i in range(MATH_CANDIDATES):
        expression, steps, value = _expression(random.Random(f"{seed}:math:{i}"))
        held_out = int(hashlib.sha256(f"{seed}:{expression}".encode()).hexdigest()[:8], 16) % MATH_HELDOUT_SHARE == 0
        if expression in seen or held_out != (split == "heldout"):
            continue
        seen.add(expression)
        prompt = f"Compute {expression} step by step."
        response = "\n".join(steps) + f"\nThe answer is {value}."
        out.append({"key": prompt, "category": MATH, "messages": _user(prompt), "response": response})
    return out


def mt_bench(docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    out = []
    for d in docs:
        first = "Complete this Python function:\n\n" + d.with_docstring()
        turns = _user(first, d.body + "\n", "Now say in one line what it does.")
        out.append(
            {
                "key": "\x00".join(t["content"] for t in turns),
                "category": CHAT,
                "messages": turns,
                "response": _one_line(d.summary),
            }
        )
    return out


TASKS: dict[str, Callable[[list[FunctionDoc], str, int], list[dict]]] = {
    CODE: code,
    SUMMARIZATION: summarization,
    TRANSLATION: translation,
    RAG: rag,
    MATH: math_reasoning,
    CHAT: mt_bench,
}


def task_examples(name: str, docs: list[FunctionDoc], split: str, seed: int) -> list[dict]:
    """The examples of one task for one split (``train`` or ``heldout``)."""
    return TASKS[name](docs, split, seed)
