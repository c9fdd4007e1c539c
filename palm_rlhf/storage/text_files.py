"""Reading text files users hand us (corpora, SFT pairs, preferences, prompts, ranking logs): the
bytes, their UTF-8 text, JSONL records and string fields, each error naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: not a valid gzip file ({error})") from None
    return data


def decode_utf8(path: Path, data: bytes) -> str:
    """Strict UTF-8: a NUL byte means a binary file, which would otherwise train on garbage."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{path}: binary file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 at byte {error.start} ({error.reason})"
        ) from None


def parse_jsonl(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; JSON Lines allows no other line content.
    Lines end at "\n" only (a "\r" before it is dropped): str.splitlines would also break
    at U+2028, U+0085 and others, which JSON strings may hold unescaped."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def string_field(path: Path, lineno: int, obj: dict[str, Any], field: str) -> str:
    if field not in obj:
        raise ValueError(f"{path}:{lineno}: missing field {field!r} (has {sorted(obj)})")
    if not isinstance(obj[field], str):
        kind = type(obj[field]).__name__
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {kind}")
    return obj[field]
