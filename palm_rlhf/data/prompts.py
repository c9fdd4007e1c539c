"""Prompt files, the one reader every command that takes `--prompts` uses.

Three sources:
- `stdlib`: snippets of the built-in corpus (see `labeler.stdlib_prompts`);
- a `.jsonl` (or `.jsonl.gz`) file: one object per line with a string `prompt` and any other
  fields (a reference answer, a source), which travel with the prompt as `fields`; a prompt may
  span several lines there;
- any other file: one prompt per non-blank line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..storage.text_files import decode_utf8, parse_jsonl, read_bytes, string_field
from .corpus import resolve_corpus, split_documents


@dataclass(frozen=True)
class PromptRecord:
    """A prompt and the other fields of its JSONL row (empty for text files and stdlib)."""

    prompt: str
    fields: dict[str, Any] = field(default_factory=dict)


def read_prompts(spec: str, num_prompts: int | None = None, seed: int = 0) -> list[PromptRecord]:
    """`spec` is 'stdlib' (num_prompts snippets, 600 by default) or a prompts file."""
    if spec == "stdlib":
        count = 600 if num_prompts is None else num_prompts
        return [PromptRecord(p) for p in stdlib_prompts(count, "train", seed)]
    if num_prompts is not None:
        raise ValueError("--num-prompts only applies to --prompts stdlib; a file gives its own")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    text = decode_utf8(path, read_bytes(path))
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        records = []
        for lineno, obj in parse_jsonl(path, text):
            prompt = string_field(path, lineno, obj, "prompt")
            if not prompt:
                raise ValueError(f"{path}:{lineno}: field 'prompt' is empty")
            records.append(PromptRecord(prompt, {k: v for k, v in obj.items() if k != "prompt"}))
    else:
        records = [PromptRecord(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return records


def stdlib_prompts(
    count: int, split: str = "train", seed: int = 0, lines: int = 3, max_chars: int = 160
) -> list[str]:
    """`count` prompts of `lines` consecutive non-blank source lines (ending in a newline) from
    random places in the stdlib corpus split, chosen deterministically by `seed`."""
    rng = random.Random(seed)
    documents = list(split_documents(resolve_corpus("stdlib"), split))  # type: ignore[arg-type]
    prompts: list[str] = []
    while len(prompts) < count:
        source = rng.choice(documents).split("\n")
        start = rng.randrange(max(1, len(source) - lines))
        chunk = [line for line in source[start : start + lines] if line.strip()]
        text = "\n".join(chunk) + "\n"
        if chunk and len(text) <= max_chars:
            prompts.append(text)
    return prompts
