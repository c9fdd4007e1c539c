"""Tokenizers: a small protocol and a byte-level tokenizer with distinct special tokens.

Ids 0..255 are the UTF-8 bytes; pad, bos and eos follow. Pad and eos must differ (RLHF
checklist item 2): masking padding must never mask the token that ends a response.

The bos convention, the same in every stage: every sequence a model reads starts with bos.
Pretraining documents are `[bos] + doc + [eos]` (data/corpus.py), SFT and reward-model rows are
`[bos] + prompt + response + [eos]` (data/sft.py, data/preferences.py), and every generating stage
(generate, sampling for labels, PPO) feeds the policy `encode_prompt`'s `[bos] + prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes plus pad, bos and eos: lossless on any text, no vocabulary file."""

    num_bytes = 256

    def __init__(self) -> None:
        self.pad_id = 256
        self.bos_id = 257
        self.eos_id = 258
        self.vocab_size = 259
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Bytes back to text; special ids are dropped and broken UTF-8 is replaced, not raised
        (a sampled response may stop in the middle of a multi-byte character)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < self.num_bytes).decode("utf-8", errors="replace")

    def encode_batch(
        self,
        texts: Sequence[str],
        padding_side: Literal["left", "right"] = "left",
        add_bos: bool = False,
        add_eos: bool = False,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to a rectangle. Returns (ids, mask), both (b, n); mask True = real token.

        Left padding is what generation wants (every row ends at the same column);
        right padding is what training wants. Longer rows are cut to `max_length`, keeping the
        end for left padding and the start for right padding.
        """
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        return pad_sequences(rows, self.pad_id, padding_side, max_length)


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end a response: eos, and for chat models their end-of-turn tokens
    (`HFTokenizer.stop_ids`). A tokenizer without `stop_ids` stops on eos alone."""
    return tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


def check_vocabulary(tokenizer: Tokenizer, num_tokens: int, model: str = "the model") -> None:
    """Every id the tokenizer produces must have an embedding (a model may have more)."""
    if tokenizer.vocab_size > num_tokens:
        raise ValueError(
            f"{model} has {num_tokens} token embeddings, but its tokenizer "
            f"({type(tokenizer).__name__}) produces ids up to {tokenizer.vocab_size - 1}"
        )


def encode_prompt(tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The policy's input for a prompt: [bos] + the prompt's tokens, at most max_tokens in all.

    The one owner of this layout (generate, the labeler's sampling and PPO call it). A long
    prompt loses tokens from its left, where they matter least for what comes next; bos is
    never cut, since the model only ever saw sequences that start with it.
    """
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[max(0, len(ids) - (max_tokens - 1)) :] if max_tokens > 1 else []
    return [tokenizer.bos_id, *ids]


def pad_sequences(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: Literal["left", "right"] = "left",
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to (b, n) ids and a bool mask (True = real token)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(rows) == 0:
        raise ValueError("cannot pad an empty batch")
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        rows = [r[-max_length:] if padding_side == "left" else r[:max_length] for r in rows]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row) == 0:
            continue
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = True
    return ids, mask
