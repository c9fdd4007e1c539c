"""The tokenizer files a checkpoint carries (tokenizer.json and its companions, or none for the
byte tokenizer), and the one way every stage gets a checkpoint's tokenizer back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..storage.checkpoint import resolve_run_dir
from .base import ByteTokenizer, Tokenizer, check_vocabulary
from .hf import HFTokenizer

# The files a Hugging Face tokenizer is made of (`palm_rlhf.hf.tokenizer`). A checkpoint holds
# them beside its weights when its model reads that tokenizer; a checkpoint without them reads
# the byte tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def load_tokenizer(files: dict[str, str]) -> Tokenizer:
    """The tokenizer of a checkpoint from its tokenizer files' texts (`PaLM.tokenizer_files`):
    a Hugging Face tokenizer where there is a tokenizer.json, else the byte tokenizer."""
    if "tokenizer.json" in files:
        return HFTokenizer(files)
    return ByteTokenizer()


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """What a checkpoint saves of a tokenizer: its files' texts (none for the byte tokenizer,
    which a checkpoint without tokenizer files stands for)."""
    return dict(getattr(tokenizer, "files", None) or {})


def read_tokenizer_files(directory: str | Path) -> dict[str, str]:
    """The texts of the TOKENIZER_FILES a directory holds (a run directory stands for its
    latest checkpoint)."""
    directory = resolve_run_dir(Path(directory))
    return {
        name: (directory / name).read_text(encoding="utf-8")
        for name in TOKENIZER_FILES
        if (directory / name).is_file()
    }


def checkpoint_tokenizer(directory: str | Path, given: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer a checkpoint's model reads (its tokenizer files; none: bytes). A stage
    starting from the checkpoint uses it; a different tokenizer given is an error, since the
    embeddings would be read with another vocabulary."""
    found = load_tokenizer(read_tokenizer_files(directory))
    if given is not None and (
        type(given) is not type(found) or tokenizer_files(given) != tokenizer_files(found)
    ):
        raise ValueError(
            f"{directory}: its model reads a {type(found).__name__} (its tokenizer files), "
            f"not the given {type(given).__name__}; leave the tokenizer out"
        )
    return found


def model_tokenizer(model: Any, name: str = "the model") -> Tokenizer:
    """The tokenizer a loaded PaLM reads (its `tokenizer_files`), checked against its
    embeddings (`check_vocabulary`); `name` says which model in the error."""
    tokenizer = load_tokenizer(model.tokenizer_files)
    check_vocabulary(tokenizer, model.config.num_tokens, name)
    return tokenizer
