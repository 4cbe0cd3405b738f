"""Small documented functions of the stdlib corpus, the material of most kit tasks, and the
prompt-row helpers every task shares.

Rows follow the prompt-dataset contract (DESIGN.md): ``id``, ``messages``, a reference
``response`` and a ``category``. Train rows come from the corpus's train files, eval rows from the
held-out files, so the two splits never share a function.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import textwrap
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIN_BODY_LINES, MAX_BODY_LINES = 1, 10
MAX_BODY_CHARS, MAX_DOC_CHARS = 360, 200


@dataclass(frozen=True)
class FunctionDoc:
    """One small documented function: its ``def`` lines (dedented), the first paragraph of its
    docstring, its body after the docstring, and the body's indent."""

    name: str
    header: str
    summary: str
    body: str
    indent: str
    source: str

    @property
    def signature(self) -> str:
        """The ``def`` line(s) as one line, without the trailing colon."""
        return " ".join(line.strip() for line in self.header.splitlines()).rstrip(":")

    def with_docstring(self) -> str:
        """The header and the docstring's summary: what code completion is asked to continue."""
        summary = textwrap.indent(self.summary, self.indent).lstrip()
        return f'{self.header}\n{self.indent}"""{summary}"""\n'

    def without_docstring(self) -> str:
        """The whole function with its docstring left out: what summarisation reads."""
        return f"{self.header}\n{self.body}\n"


def function_docs(texts: dict[str, str]) -> list[FunctionDoc]:
    """Every small documented function of the given files, in file order; a function whose
    header and summary repeat an earlier one's is dropped."""
    out, seen = [], set()
    for rel in sorted(texts):
        for doc in _file_docs(texts[rel], rel):
            key = doc.with_docstring()
            if key in seen:
                continue
            seen.add(key)
            out.append(doc)
    return out


def _file_docs(source: str, rel: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = _function_doc(node, lines, rel)
            if doc is not None:
                yield doc


def _function_doc(node, lines: list[str], rel: str) -> FunctionDoc | None:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2 or node.end_lineno is None:
        return None
    summary = doc.strip().split("\n\n")[0].strip()
    if len(summary) > MAX_DOC_CHARS or '"""' in summary or "\\" in summary:
        return None
    body_start = node.body[1].lineno
    if any(getattr(d, "lineno", body_start) >= body_start for d in node.decorator_list):
        return None
    header = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
    body = "\n".join(lines[body_start - 1 : node.end_lineno])
    # dedent header and body together so a method's body keeps its indent relative to its def
    block = textwrap.dedent(header + "\n" + body).split("\n")
    n_header = header.count("\n") + 1
    header_d, body_d = block[:n_header], block[n_header:]
    body_text = "\n".join(body_d).rstrip()
    nbody = len([ln for ln in body_d if ln.strip()])
    if not (MIN_BODY_LINES <= nbody <= MAX_BODY_LINES) or len(body_text) > MAX_BODY_CHARS:
        return None
    if not body_text.strip() or "\t" in body_text:
        return None
    indent = " " * (len(body_d[0]) - len(body_d[0].lstrip()))
    return FunctionDoc(node.name, "\n".join(header_d), summary, body_text, indent, rel)


def make_row(split: str, index: int, example: dict) -> dict:
    """A prompt row of an example (``messages``, ``response``, ``category``); the id carries the
    split, the position and a digest of the conversation, so it is unique and stable."""
    conversation = "\x00".join(m["content"] for m in example["messages"])
    digest = hashlib.sha256(conversation.encode()).hexdigest()[:8]
    return {
        "id": f"kit-{split}-{index:04d}-{digest}",
        "category": example["category"],
        "messages": example["messages"],
        "response": example["response"],
    }


def select(examples: list[dict], count: int | None, seed: int, fits) -> list[dict]:
    """Up to ``count`` (None: all) examples in a seeded order, keeping those ``fits`` accepts."""
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e['key']}".encode()).hexdigest())
    chosen = [e for e in ranked if fits(e)][:count]
    if count is not None and len(chosen) < count:
        log.warning("only %d of the %d requested prompt rows fit", len(chosen), count)
    return chosen


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over the groups (one per task), so any prefix of the rows covers the tasks
    evenly: ``distill.limit`` and ``eval.max_prompts`` take prefixes."""
    out: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
