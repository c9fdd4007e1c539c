"""Corpora, token caches and packed windows for pretraining.

A corpus spec ("stdlib", a text/.gz/.jsonl file or a folder) resolves to sorted sources; a split
is tokenized once into a cached flat int16 (int32 for vocabularies over 32,768) file
(`[bos_id] + doc_tokens + [eos_id]` per
document: every stage's sequences start with bos, tokenizers/base.py) that is memory-mapped for
`PackedDataset` (nanoGPT-style windows). Errors name the file (and line).
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..storage.atomic import read_json, write_bytes_atomic, write_stream_atomic
from ..storage.text_files import decode_utf8, parse_jsonl, read_bytes, string_field
from ..tokenizers.base import Tokenizer

FORMAT_VERSION = 2


"""Bumped whenever the token file layout or the split rule changes: old caches are ignored.
Version 2: documents start with bos."""


HELDOUT_FRACTION = 0.02


SPLITS = ("train", "heldout")


Split = Literal["train", "heldout"]


# Test suites are left out of the stdlib corpus: they hold deliberately mis-encoded fixtures
# (test_source_encoding, encoded_modules) and would more than double it (~12 MB -> ~31 MB).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


# Probed through the tokenizer for the cache key, so two tokenizers with the same class and
# vocab size but different merges never share a cache.
_TOKENIZER_PROBE = "def f(x):\n\treturn x  # Übergrößenträger 日本語 0123456789 \r\n"


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files, sorted by relative path.

    A corpus every machine has, with no download; sorting makes splits and caches deterministic.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.isdisjoint(relative.parts[:-1]) and path.is_file():
            found.append((relative.as_posix(), path))
    return [path for _, path in sorted(found)]


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether `name` falls in the held-out split: a sha256 of the name, not Python's salted
    hash(), so the split is the same in every process, run and machine."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class DocumentSource:
    """One file of a corpus. `name` (path relative to the corpus root) decides its split."""

    name: str
    path: Path
    kind: Literal["text", "jsonl"] = "text"
    jsonl_field: str = "text"

    def documents(self) -> Iterator[str]:
        """The file's texts: the whole file for text, one per non-blank line for JSONL."""
        text = decode_utf8(self.path, read_bytes(self.path))
        if self.kind == "text":
            yield text
            return
        for lineno, obj in parse_jsonl(self.path, text):
            yield string_field(self.path, lineno, obj, self.jsonl_field)

    def fingerprint(self) -> list[Any]:
        """What the cache key needs to notice an edit without reading the file."""
        st = self.path.stat()
        return [self.name, str(self.path), self.kind, self.jsonl_field, st.st_size, st.st_mtime_ns]


def resolve_corpus(spec: str, jsonl_field: str = "text") -> list[DocumentSource]:
    """Turn a corpus spec into sorted sources: "stdlib" (the keyword; write ./stdlib for a folder
    of that name), a text / .gz / .jsonl(.gz) file, or a folder (regular files, recursively,
    hidden ones skipped, each read by its own suffix)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        sources = [_source(p, p.relative_to(root).as_posix(), jsonl_field) for p in stdlib_files()]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such corpus file or folder")
        if path.is_dir():
            files = sorted(
                (p.relative_to(path).as_posix(), p)
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            sources = [_source(p, name, jsonl_field) for name, p in files]
        else:
            sources = [_source(path, path.name, jsonl_field)]
    if not sources:
        raise ValueError(f"{spec}: empty corpus (no files; hidden files are skipped)")
    if all(s.path.stat().st_size == 0 for s in sources):
        raise ValueError(f"{spec}: empty corpus (every file is empty)")
    if len(sources) == 1 and not any(sources[0].documents()):
        raise ValueError(f"{sources[0].path}: empty corpus (no non-empty documents)")
    return sources


def _source(path: Path, name: str, jsonl_field: str) -> DocumentSource:
    kind = "jsonl" if path.name.lower().endswith((".jsonl", ".jsonl.gz")) else "text"
    return DocumentSource(name=name, path=path, kind=kind, jsonl_field=jsonl_field)


def split_documents(
    sources: Sequence[DocumentSource], split: Split, fraction: float = HELDOUT_FRACTION
) -> Iterator[str]:
    """The non-empty documents of one split, in corpus order.

    Several files: split by file name, so a file never straddles the splits. One file: split by
    document index ("name#i"). Either way, if hashing leaves a split empty (likely below ~50
    units at 2%), the last unit alone is held out. A single-document corpus holds out its last
    lines (about `fraction` of them, at least one); a one-line document cannot be split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "heldout"
    if len(sources) > 1:  # empty files hold no text, so they never take the held-out place
        sources = [s for s in sources if s.path.stat().st_size > 0] or sources[-1:]
        flags = _both_sides([is_heldout(s.name, fraction) for s in sources])
        for source, flag in zip(sources, flags, strict=True):
            if flag == want_heldout:
                yield from (doc for doc in source.documents() if doc)
        return
    (source,) = sources
    docs = [doc for doc in source.documents() if doc]
    if len(docs) == 1:
        yield _split_lines(source, docs[0], fraction)[want_heldout]
        return
    flags = _both_sides([is_heldout(f"{source.name}#{i}", fraction) for i in range(len(docs))])
    yield from (doc for doc, flag in zip(docs, flags, strict=True) if flag == want_heldout)


def _both_sides(flags: list[bool]) -> list[bool]:
    if len(flags) > 1 and (all(flags) or not any(flags)):
        return [False] * (len(flags) - 1) + [True]
    return flags


def _split_lines(source: DocumentSource, doc: str, fraction: float) -> tuple[str, str]:
    lines = doc.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(
            f"{source.path}: a corpus of one single-line document cannot be split into train "
            "and held-out; add lines or documents"
        )
    cut = len(lines) - max(1, round(fraction * len(lines)))
    return "".join(lines[:cut]), "".join(lines[cut:])


def build_token_file(
    sources: Sequence[DocumentSource],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    split: Split,
    fraction: float = HELDOUT_FRACTION,
) -> Path:
    """Tokenize one split once into `cache_dir/<split>-<key>.tokens` and return its path.

    The key hashes the sources (names, sizes, mtimes), the tokenizer, the split and the format
    version, so an edit makes a new file and an unchanged corpus reuses the old one. The
    `.json` sidecar (num_tokens, num_bytes for bits-per-byte) is written last and marks the
    cache complete; both are written atomically, so a killed build is simply redone.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    key = _cache_key(sources, tokenizer, split, fraction)
    path = Path(cache_dir) / f"{split}-{key[:24]}.tokens"
    try:
        _read_meta(path)
        return path
    except (FileNotFoundError, ValueError):
        pass  # missing, half-written or stale: build it
    stats = {"num_tokens": 0, "num_bytes": 0, "num_documents": 0}

    def fill(handle: BinaryIO) -> None:  # streamed: the file object buffers the writes
        for doc in split_documents(sources, split, fraction):
            # native-endian, as torch.from_file reads; bos + doc + eos (tokenizers/base.py)
            ids = array(ARRAY_CODES[dtype], tokenizer.encode(doc, add_bos=True, add_eos=True))
            handle.write(ids.tobytes())
            stats["num_tokens"] += len(ids)
            stats["num_bytes"] += len(doc.encode("utf-8"))
            stats["num_documents"] += 1
        if stats["num_documents"] == 0:
            raise ValueError(f"{sources[0].path}: the {split!r} split of its corpus has no text")

    write_stream_atomic(path, fill)
    meta = {"format_version": FORMAT_VERSION, "split": split, "byteorder": sys.byteorder}
    meta.update(stats, dtype=str(dtype).removeprefix("torch."), key=key)
    write_bytes_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    return path


# Token files store ids in the narrowest type that holds the vocabulary: int16 for up to
# 32,768 tokens (the byte tokenizer's 259, small BPEs), int32 beyond (Cohere's 256,000).
TOKEN_DTYPES = {"int16": torch.int16, "int32": torch.int32}


ARRAY_CODES = {torch.int16: "h", torch.int32: "i"}


def token_dtype(vocab_size: int) -> torch.dtype:
    """The dtype of a token file for ids in [0, vocab_size)."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def _cache_key(
    sources: Sequence[DocumentSource], tokenizer: Tokenizer, split: str, fraction: float
) -> str:
    cls = type(tokenizer)
    ids = (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    probe = tokenizer.encode(_TOKENIZER_PROBE)
    parts = [FORMAT_VERSION, split, fraction, f"{cls.__module__}.{cls.__qualname__}", ids, probe]
    parts.append([s.fingerprint() for s in sources])
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    """The sidecar of a token file, checked against the file it describes."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file() or not path.is_file():
        raise FileNotFoundError(f"{path}: missing token file or its sidecar {sidecar.name}")
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{sidecar}: not a version {FORMAT_VERSION} token file sidecar")
    if meta.get("byteorder") != sys.byteorder:
        raise ValueError(f"{path}: written with {meta.get('byteorder')}-endian ids")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"{sidecar}: unknown token dtype {meta.get('dtype')!r}")
    size = path.stat().st_size
    if size != TOKEN_DTYPES[meta["dtype"]].itemsize * meta.get("num_tokens", -1):
        raise ValueError(
            f"{path}: {size} bytes, but the sidecar says {meta.get('num_tokens')} tokens"
        )
    return meta


@dataclass(frozen=True)
class TokenFile:
    """A built split: `tokens` is a read-only-in-spirit memory map ((N,) int16 or int32, by
    vocabulary size), and `num_bytes`
    the UTF-8 size of its text, for bits per byte = total_nats / ln(2) / num_bytes."""

    path: Path
    tokens: Tensor
    num_bytes: int
    num_documents: int

    @classmethod
    def open(cls, path: str | Path) -> TokenFile:
        path = Path(path)
        meta = _read_meta(path)
        # shared=False maps the file MAP_PRIVATE: pages load on demand, writes never reach disk.
        tokens = torch.from_file(
            str(path), shared=False, size=meta["num_tokens"], dtype=TOKEN_DTYPES[meta["dtype"]]
        )
        return cls(path, tokens, meta["num_bytes"], meta["num_documents"])

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def load_tokens(path: str | Path) -> Tensor:
    """The (N,) memory-mapped tokens of a token file."""
    return TokenFile.open(path).tokens


class PackedDataset(Dataset):
    """Non-overlapping seq_len windows over one token stream (nanoGPT style).

    Item i is tokens[i*seq_len : i*seq_len + seq_len + 1] as int64: consecutive windows share one
    token, so each token is a target at most once; the tail past the last full window is unused.
    """

    def __init__(self, tokens: Tensor, seq_len: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"corpus has {tokens.numel()} tokens; one window of seq_len={seq_len} needs "
                f"at least {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()  # (seq_len + 1,)
