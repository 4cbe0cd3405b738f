"""Instruction rows built from real stdlib functions: "Complete this Python function" -> its body.

Rows follow the prompt-dataset contract (DESIGN.md): ``id``, ``messages`` (one user turn) and a
reference ``response``. Train rows come from the corpus's train files, eval rows from the
held-out files, so the two splits never share a function.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import textwrap

log = logging.getLogger(__name__)

INSTRUCTION = "Complete this Python function:\n\n"
MIN_BODY_LINES, MAX_BODY_LINES = 1, 10
MAX_BODY_CHARS, MAX_DOC_CHARS = 360, 200


def function_examples(texts: dict[str, str]) -> list[dict[str, str]]:
    """(prompt, response, source) for every small documented function of the given files,
    in file order, duplicates (same prompt) dropped."""
    out, seen = [], set()
    for rel in sorted(texts):
        for prompt, response in _file_examples(texts[rel]):
            if prompt in seen:
                continue
            seen.add(prompt)
            out.append({"prompt": prompt, "response": response, "source": rel})
    return out


def _file_examples(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            example = _example(node, lines)
            if example is not None:
                yield example


def _example(node, lines: list[str]) -> tuple[str, str] | None:
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
    summary_lines = textwrap.indent(summary, indent).lstrip()
    prompt = INSTRUCTION + "\n".join(header_d) + f'\n{indent}"""{summary_lines}"""\n'
    return prompt, body_text + "\n"


def make_row(split: str, index: int, example: dict[str, str]) -> dict:
    digest = hashlib.sha256(example["prompt"].encode()).hexdigest()[:8]
    return {
        "id": f"kit-{split}-{index:04d}-{digest}",
        "messages": [{"role": "user", "content": example["prompt"]}],
        "response": example["response"],
    }


def select(examples: list[dict], count: int | None, seed: int, fits) -> list[dict]:
    """Up to ``count`` (None: all) examples in a seeded order, keeping those ``fits`` accepts."""
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e['prompt']}".encode()).hexdigest())
    chosen = [e for e in ranked if fits(e)][:count]
    if count is not None and len(chosen) < count:
        log.warning("only %d of the %d requested prompt rows fit", len(chosen), count)
    return chosen
