"""Demonstrations the stdlib already holds: (a function's signature and docstring) -> (its body).

The demo's SFT stage trains on these pairs (InstructGPT's first step: prompts paired with what
people expect the model to say), and its prompts for labelling, the reward model, PPO and the
final evaluation are signature + docstring prompts of the same kind. Mined with `ast` from
the corpus's own split, so held-out prompts come only from held-out files.

A pair is, in the source's own text and indentation:

    prompt:   "def f(x):\\n    \\"\\"\\"Twice x.\\"\\"\\"\\n"        (signature through docstring)
    response: "    y = 2 * x\\n    return y\\n"                  (the body's first lines)

The response is the body's first complete lines, up to `max_response_chars`; functions whose
prompt is longer than `max_prompt_chars`, or whose body is only the docstring, are skipped.
"""

from __future__ import annotations

import ast
import functools
import random
from dataclasses import dataclass

from .corpus import resolve_corpus, split_documents


@dataclass(frozen=True)
class DocstringPair:
    prompt: str
    response: str


def pairs_from_source(
    source: str, max_prompt_chars: int = 240, max_response_chars: int = 160
) -> list[DocstringPair]:
    """Every (signature + docstring, body) pair of one module's functions and methods."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a test file of broken code, a NUL byte
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        docstring, first = node.body[0], node.body[1]
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        prompt = "".join(lines[start : docstring.end_lineno])
        if first.lineno <= docstring.end_lineno or len(prompt) > max_prompt_chars:
            continue  # a body on the docstring's line; or too long a prompt
        response = ""
        for line in lines[first.lineno - 1 : node.end_lineno]:
            if len(response) + len(line) > max_response_chars:
                break
            response += line
        if response.strip() and response.endswith("\n"):
            pairs.append(DocstringPair(prompt, response))
    return pairs


def stdlib_docstring_pairs(count: int, split: str = "train", seed: int = 0) -> list[DocstringPair]:
    """`count` pairs from the stdlib corpus split, sampled without replacement by `seed`
    (fewer when the split holds fewer); distinct prompts, none of the training ones also in a
    held-out file."""
    chosen = list(_split_pairs(split))
    if split == "train":  # a prompt text that also occurs in a held-out file is held out
        heldout = {pair.prompt for pair in _split_pairs("heldout")}
        chosen = [pair for pair in chosen if pair.prompt not in heldout]
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


@functools.lru_cache(maxsize=2)
def _split_pairs(split: str) -> tuple[DocstringPair, ...]:
    """All pairs of a split, distinct prompts, sorted (parsing the stdlib takes seconds)."""
    pairs: dict[str, DocstringPair] = {}
    for document in split_documents(resolve_corpus("stdlib"), split):  # type: ignore[arg-type]
        for pair in pairs_from_source(document):
            pairs.setdefault(pair.prompt, pair)
    return tuple(sorted(pairs.values(), key=lambda p: p.prompt))
